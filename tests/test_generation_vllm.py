"""vLLM backend: request building, output parsing and weight naming without vLLM (stand-ins shaped
like vLLM's RequestOutput / CompletionOutput); a GPU test runs the real engine where it exists."""
from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.generation import Generator
from alignkit.generation.base import SamplingParams
from alignkit.generation.vllm import (
    VLLMGenerator,
    _weight_loader,
    from_vllm_outputs,
    per_request_sampling_kwargs,
    to_vllm_sampling_kwargs,
    vllm_named_weights,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def request_output(text, token_ids, finish_reason, stop_reason=None, prompt_token_ids=(1, 2, 3)):
    out = SimpleNamespace(index=0, text=text, token_ids=list(token_ids), finish_reason=finish_reason,
                          stop_reason=stop_reason)
    return SimpleNamespace(prompt_token_ids=list(prompt_token_ids), outputs=[out], finished=True)


def test_sampling_kwargs():
    kw = to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.8, min_new_tokens=2,
                                                stop=["\n\n", "###"], seed=5))
    assert kw == {"temperature": 0.7, "top_p": 0.8, "max_tokens": 9, "min_tokens": 2, "stop": ["\n\n", "###"],
                  "seed": 5, "include_stop_str_in_output": False}
    greedy = to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=4))
    assert greedy["temperature"] == 0.0 and greedy["stop"] is None and greedy["seed"] is None
    seeds = [k["seed"] for k in per_request_sampling_kwargs(SamplingParams(temperature=1.0, seed=10), 4)]
    assert seeds == [10, 11, 12, 13]  # a GRPO group of repeated prompts gets distinct samples
    assert [k["seed"] for k in per_request_sampling_kwargs(SamplingParams(), 2)] == [None, None]


def test_outputs_parsing_eos_length_and_stop(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = tok.eos_token_id
    hello = tok("Hello world")["input_ids"]
    with_stop = tok("Hello world. Next")["input_ids"][:len(tok("Hello world.")["input_ids"])]
    outs = [
        request_output("Hello world", hello + [eos], "stop"),  # EOS kept by vLLM in token_ids
        request_output("Hello world", hello, "length", prompt_token_ids=[7] * 5),
        request_output("Hello world", with_stop, "stop", stop_reason="."),  # stop string cut from text
        request_output("Hello world. More", hello, "stop", stop_reason=None),  # server forgot to cut
    ]
    got = from_vllm_outputs(outs, eos_token_ids=[eos], stop=["."], tokenizer=tok)
    assert [c.text for c in got] == ["Hello world"] * 4
    assert [c.finish_reason for c in got] == ["stop", "length", "stop", "stop"]
    assert got[0].token_ids == hello and got[1].token_ids == hello
    assert got[2].token_ids == hello  # the "." token is gone: tokens wholly before the cut
    assert got[1].prompt_tokens == 5 and got[0].prompt_tokens == 3
    # Without a tokenizer, token ids of a stop string cannot be trimmed: kept as vLLM gave them.
    assert from_vllm_outputs(outs[2:3], stop=["."])[0].token_ids == with_stop


def test_outputs_parsing_errors():
    with pytest.raises(ValueError, match="output 1 has no samples"):
        from_vllm_outputs([request_output("a", [1], "stop"), SimpleNamespace(outputs=[], prompt_token_ids=[])])
    with pytest.raises(ValueError, match="output 0 is unfinished"):
        from_vllm_outputs([request_output("a", [1], None)])


class FakeLLM:
    """Records calls like vllm.LLM would receive them and answers with stand-in outputs."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, {"use_tqdm": use_tqdm}))
        return [request_output(f"<{p}>", [5, 6], "length") for p in prompts]

    def chat(self, messages, sampling_params, use_tqdm=True, add_generation_prompt=False):
        self.calls.append(("chat", messages, sampling_params, {"add_generation_prompt": add_generation_prompt}))
        return [request_output(m[-1]["content"], [5], "stop") for m in messages]


def fake_generator():
    gen = object.__new__(VLLMGenerator)  # skip the engine; everything else is the real class
    gen.llm, gen._sampling_params_cls = FakeLLM(), dict
    gen.tokenizer, gen.eos_token_ids, gen.name = None, [0], "vllm:fake"
    from alignkit.generation.stats import GenerationStats

    gen.stats = GenerationStats()
    return gen


def test_generator_builds_requests_and_parses():
    gen = fake_generator()
    assert isinstance(gen, Generator)
    out = gen.generate(["a", "b", "a"], SamplingParams(max_new_tokens=2, temperature=1.0, seed=3))
    assert [c.text for c in out] == ["<a>", "<b>", "<a>"] and all(c.finish_reason == "length" for c in out)
    _, prompts, sps, extra = gen.llm.calls[-1]
    assert prompts == ["a", "b", "a"] and [sp["seed"] for sp in sps] == [3, 4, 5] and not extra["use_tqdm"]
    conv = [{"role": "user", "content": "hi"}]
    assert gen.chat([conv], SamplingParams(max_new_tokens=2))[0].text == "hi"
    assert gen.llm.calls[-1][0] == "chat" and gen.llm.calls[-1][3]["add_generation_prompt"] is True
    assert gen.stats.requests == 4 and gen.stats.generated_tokens == 2 * 3 + 1
    assert gen.generate([], SamplingParams()) == []


def test_weight_loader_paths():
    loaded = []
    runner_model = SimpleNamespace(load_weights=loaded.extend)
    old = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=runner_model)))))
    _weight_loader(old)([("a", 1)])
    assert loaded == [("a", 1)]
    new = SimpleNamespace(llm_engine=SimpleNamespace(), apply_model=lambda fn: fn(runner_model))
    _weight_loader(new)([("b", 2)])
    assert loaded == [("a", 1), ("b", 2)]
    with pytest.raises(RuntimeError, match="apply_model"):
        _weight_loader(SimpleNamespace(llm_engine=None))


def test_named_weights_plain_model(tiny_model):
    with vllm_named_weights(tiny_model) as pairs:
        names = [n for n, _ in pairs]
    # Names a fresh model of the same class loads with nothing unexpected; only the tied head is absent.
    fresh = type(tiny_model)(tiny_model.config)
    missing, unexpected = fresh.load_state_dict(dict(pairs), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert "model.embed_tokens.weight" in names


def test_named_weights_peft_merged_and_unmerged(tiny_model_dir):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain_names = {n for n, _ in copy.deepcopy(base).named_parameters()}
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().double().clone()  # (out, in)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B is zero at init: make the merge visible
    a = layer.lora_A["default"].weight.detach().double()  # (r, in)
    b = layer.lora_B["default"].weight.detach().double()  # (out, r)
    with vllm_named_weights(model) as pairs:
        got = dict(pairs)
        merged = got["model.layers.0.self_attn.q_proj.weight"].double().clone()
    assert set(got) == plain_names
    torch.testing.assert_close(merged, w0 + (8 / 4) * b @ a)  # W + (alpha / r) B A  (LoRA, Hu et al. 2021)
    torch.testing.assert_close(layer.base_layer.weight.double(), w0)  # unmerged again afterwards


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'alignkit\[vllm\]'"):
        VLLMGenerator("some/model")


@pytest.mark.gpu
@pytest.mark.real_model
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_vllm_greedy_matches_hf_on_smollm2():
    models = pytest.importorskip("alignkit.models")
    from alignkit.generation.hf import HFGenerator

    source = models.resolve_model(models.DEFAULT_MODEL)
    model, tokenizer, _ = models.load_model(source.path, dtype=torch.float32, device="cuda", for_generation=True)
    gen = VLLMGenerator(source.path, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    conv = [[{"role": "user", "content": "What is 2 + 3?"}]]
    params = SamplingParams(max_new_tokens=8)
    ours = gen.chat(conv, params)[0]
    assert ours.token_ids == HFGenerator(model, tokenizer).chat(conv, params)[0].token_ids
    gen.update_weights(model)  # same weights: generation unchanged
    assert gen.chat(conv, params)[0].token_ids == ours.token_ids
    group = gen.generate(["Once upon a time"] * 4, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
    assert len({tuple(c.token_ids) for c in group}) > 1


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_make_generator_vllm_without_vllm():
    from alignkit.generation import make_generator

    with pytest.raises(ImportError, match="alignkit\\[vllm\\]"):
        make_generator("vllm:some/model")
