"""alignkit.generation.factory.make_generator: which backend each spec builds, with what, and the refusals."""
from __future__ import annotations

import re

import pytest
import requests
import torch
from safetensors.torch import load_file

from alignkit.generation import factory
from alignkit.generation.base import Generator
from alignkit.generation.factory import make_generator
from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import OpenAIHTTPGenerator


@pytest.fixture
def no_network(monkeypatch):
    """Any HTTP request fails the test: building an HTTP generator must not contact the server."""

    def refuse(*args, **kwargs):
        raise AssertionError("make_generator sent a request")

    monkeypatch.setattr(requests.Session, "send", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


# ------------------------------------------------------------------------------------------------ hf
def test_hf_spec_reuses_a_passed_model_and_tokenizer(tiny_model, gpt2_tokenizer):
    gen = make_generator("hf:my-policy", model=tiny_model, tokenizer=gpt2_tokenizer, batch_size=3)
    assert type(gen) is HFGenerator and isinstance(gen, Generator)
    assert gen.model is tiny_model and gen.tokenizer is gpt2_tokenizer
    assert gen.name == "hf:my-policy"  # the spec names it, whatever the model's own name_or_path
    assert gen.batch_size == 3


def test_hf_spec_loads_the_folder_with_the_given_options(tiny_model_dir):
    gen = make_generator(f"hf:{tiny_model_dir}", batch_size=2, device="cpu", dtype="float32")
    assert type(gen) is HFGenerator and gen.name == f"hf:{tiny_model_dir}" and gen.batch_size == 2
    # the weights are the folder's (read back independently from the safetensors file)
    saved = load_file(tiny_model_dir / "model.safetensors")
    params = dict(gen.model.named_parameters())
    assert set(saved) <= set(params) | {k for k, _ in gen.model.named_buffers()}
    for key, tensor in saved.items():
        if key in params:
            assert torch.equal(params[key].detach(), tensor.float()), key
    assert next(gen.model.parameters()).dtype == torch.float32
    # loaded for generation: left padding (prompts end where generation starts) and a pad token
    assert gen.tokenizer.padding_side == "left" and gen.tokenizer.pad_token_id is not None
    # keyword arguments reach the model loader
    half = make_generator(f"hf:{tiny_model_dir}", device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_hf_spec_with_a_model_but_no_tokenizer_is_refused(tiny_model):
    with pytest.raises(ValueError, match="pass the tokenizer too"):
        make_generator("hf:x", model=tiny_model)


# ------------------------------------------------------------------------------------------------ http
@pytest.mark.parametrize("spec, kwargs, base_url, model", [
    ("http://127.0.0.1:9/v1", {"model": "served"}, "http://127.0.0.1:9/v1", "served"),
    ("http://127.0.0.1:9/v1#policy", {}, "http://127.0.0.1:9/v1", "policy"),
    ("https://example.invalid/v1/#a/b-1B", {}, "https://example.invalid/v1", "a/b-1B"),
    ("http://127.0.0.1:9/v1#same", {"model": "same"}, "http://127.0.0.1:9/v1", "same"),
])
def test_http_spec_builds_an_openai_client_without_a_request(no_network, spec, kwargs, base_url, model):
    gen = make_generator(spec, **kwargs)
    assert type(gen) is OpenAIHTTPGenerator and isinstance(gen, Generator)
    assert (gen.base_url, gen.model) == (base_url, model)
    assert "#" not in gen.base_url


def test_http_spec_passes_client_options(no_network):
    gen = make_generator("http://127.0.0.1:9/v1", model="m", max_concurrency=3, timeout=7, max_retries=0,
                         use_chat=True, api_key="secret")
    assert (gen.max_concurrency, gen.timeout, gen.max_retries, gen.use_chat) == (3, 7, 0, True)
    assert gen._headers["Authorization"] == "Bearer secret"


@pytest.mark.parametrize("spec, kwargs", [
    ("http://127.0.0.1:9/v1", {}),
    ("http://127.0.0.1:9/v1#", {}),
    ("http://127.0.0.1:9/v1", {"model": ""}),
])
def test_http_spec_without_a_served_name_is_refused(no_network, spec, kwargs):
    with pytest.raises(ValueError, match=r"needs the served model's name \(model='NAME' or 'URL#NAME'\)"):
        make_generator(spec, **kwargs)


# ------------------------------------------------------------------------------------------------ vllm
def test_vllm_spec_hands_path_and_engine_options_to_vllm_generator(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, path, **kw):
            seen.append((path, kw))

    monkeypatch.setattr(factory, "VLLMGenerator", Recorder)
    gen = make_generator("vllm:/models/policy", gpu_memory_utilization=0.3, max_model_len=512)
    assert isinstance(gen, Recorder)
    assert seen == [("/models/policy", {"gpu_memory_utilization": 0.3, "max_model_len": 512})]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("spec", ["", None, 3, ["hf:x"]])
def test_missing_or_non_string_spec_is_refused(spec):
    with pytest.raises(ValueError, match=r"expected a spec string \('hf:PATH_OR_NAME'"):
        make_generator(spec)


@pytest.mark.parametrize("spec", ["gpt-4", "hf", "ftp://host/v1", "vllm", "openai:gpt-4"])
def test_unknown_spec_is_refused_naming_the_valid_forms(spec):
    expected = (f"unknown generator spec {spec!r}; "
                "expected 'hf:PATH_OR_NAME', 'vllm:PATH_OR_NAME', 'http://HOST:PORT/v1'")
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_generator(spec)


def test_settings_other_backends_do_not_read_are_refused(no_network):
    with pytest.raises(ValueError, match=r"two different model names"):
        make_generator("http://127.0.0.1:9/v1#fragment", model="explicit")
    with pytest.raises(ValueError, match=r"batch_size= is read by the hf backend only"):
        make_generator("http://127.0.0.1:9/v1", model="m", batch_size=4)
    with pytest.raises(ValueError, match=r"tokenizer= is read by the hf backend only"):
        make_generator("http://127.0.0.1:9/v1", model="m", tokenizer=object())
    with pytest.raises(ValueError, match=r"batch_size= is read by the hf backend only"):
        make_generator("vllm:some/model", batch_size=4)
