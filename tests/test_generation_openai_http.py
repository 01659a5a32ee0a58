"""OpenAIHTTPGenerator: round trips against a real ``transformers serve`` (slow: ~25 s startup),
checked against HFGenerator on the same weights; fault injection against a fake server."""
from __future__ import annotations

import _thread
import base64
import threading
import time

import pytest
import torch
from conftest import build_tiny_llama
from servers import CHAT_TEMPLATE, Action, FakeOpenAIServer, free_port, transformers_serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.generation import Generator
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import GenerationHTTPError, OpenAIHTTPGenerator, redact_url

FAST = {"backoff": 0.01, "timeout": 5}
GRACE = 0.1  # s: a request already being sent when the stop event is set may be recorded just after it


# ---------------------------------------------------------------------- fake server: request building
def test_request_fields_order_and_client_side_stop():
    with FakeOpenAIServer() as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", api_key="k", **FAST)
        assert isinstance(gen, Generator)
        params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, stop=[" STOP"], seed=3,
                                min_new_tokens=2)
        prompts = [f"p{i}" for i in range(5)]
        out = gen.generate(prompts, params)
    assert [c.text for c in out] == [f"[p{i}]" for i in range(5)]  # cut before " STOP"
    assert all(c.finish_reason == "stop" and c.token_ids == [] and c.prompt_tokens == 5 for c in out)
    bodies = {s.body["prompt"]: s.body for s in srv.seen}
    assert {s.path for s in srv.seen} == {"/v1/completions"}
    for i in range(5):
        b = bodies[f"p{i}"]
        assert (b["model"], b["max_tokens"], b["temperature"], b["top_p"]) == ("m", 7, 0.5, 0.9)
        assert b["stop"] == [" STOP"] and b["seed"] == 3 + i and b["min_tokens"] == 2
    assert gen.stats.requests == 5 and gen.stats.generated_tokens == 15 and gen.stats.prompt_tokens == 25


def test_chat_and_use_chat_hit_chat_endpoint():
    with FakeOpenAIServer() as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", **FAST)
        conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
        c = gen.chat([conv], SamplingParams(max_new_tokens=4))[0]
        assert (c.text, c.finish_reason) == ("[hi] STOP tail", "length")
        assert srv.seen[-1].path == "/v1/chat/completions" and srv.seen[-1].body["messages"] == conv
        assert "stop" not in srv.seen[-1].body and "seed" not in srv.seen[-1].body
        g2 = OpenAIHTTPGenerator(srv.base_url, "m", use_chat=True, **FAST)
        assert g2.generate(["q"], SamplingParams(max_new_tokens=4))[0].text == "[q] STOP tail"
        assert srv.seen[-1].body["messages"] == [{"role": "user", "content": "q"}]


def test_concurrency_is_bounded_and_parallel():
    with FakeOpenAIServer(default_delay=0.15) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", max_concurrency=3, **FAST)
        out = gen.generate([str(i) for i in range(12)], SamplingParams(max_new_tokens=2))
    assert [c.text for c in out] == [f"[{i}] STOP tail" for i in range(12)]  # order kept
    assert 1 < srv.max_in_flight <= 3


# ---------------------------------------------------------------------- fake server: faults
def test_500_then_success_is_retried():
    with FakeOpenAIServer([Action(status=500, body={"error": "boom"}), Action(status=502, body="bad")]) as srv:
        out = OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))
    assert out[0].text == "[x] STOP tail" and len(srv.seen) == 3


def test_429_honours_retry_after():
    with FakeOpenAIServer([Action(status=429, body={"error": "slow down"}, headers={"Retry-After": "1"})]) as srv:
        out = OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))
    assert out[0].text == "[x] STOP tail"
    assert len(srv.seen) == 2 and srv.seen[1].at - srv.seen[0].at >= 0.95  # not the 0.01 s backoff


def test_timeout_is_retried_then_gives_up():
    """With retry_timeouts=True (off by default: see test_timed_out_request_is_not_resent)."""
    with FakeOpenAIServer([Action(delay=1.0)]) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", timeout=0.3, backoff=0.01, retry_timeouts=True)
        assert gen.generate(["x"], SamplingParams(max_new_tokens=2))[0].text == "[x] STOP tail"
        assert len(srv.seen) == 2
    with FakeOpenAIServer([Action(delay=1.0)] * 3) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", timeout=0.3, backoff=0.01, max_retries=2, retry_timeouts=True)
        with pytest.raises(GenerationHTTPError, match="failed after 3 attempts.*Timeout"):
            gen.generate(["x"], SamplingParams(max_new_tokens=2))
        assert len(srv.seen) == 3


def test_retries_exhausted_on_5xx_and_connection_refused():
    with FakeOpenAIServer([Action(status=503, body="down")] * 5) as srv:
        with pytest.raises(GenerationHTTPError, match=r"failed after 2 attempts.*HTTP 503"):
            OpenAIHTTPGenerator(srv.base_url, "m", max_retries=1, **FAST).generate(
                ["x"], SamplingParams(max_new_tokens=2))
        assert len(srv.seen) == 2
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(GenerationHTTPError, match="ConnectionError"):
        OpenAIHTTPGenerator(dead, "m", max_retries=1, **FAST).generate(["x"], SamplingParams(max_new_tokens=2))


def test_4xx_is_not_retried_and_quotes_server():
    with (FakeOpenAIServer([Action(status=400, body={"error": "unknown model"})]) as srv,
          pytest.raises(GenerationHTTPError, match="HTTP 400.*unknown model")):
        OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))
    assert len(srv.seen) == 1


@pytest.mark.parametrize("body, match", [
    ("this is {not json", r"malformed JSON.*this is \{not json"),
    ({"id": "x", "choices": []}, "no choices"),
    ({"choices": [{"index": 0, "finish_reason": "stop"}]}, r"choices\[0\].text missing"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_answers_say_what_was_received(body, match):
    with FakeOpenAIServer([Action(body=body)]) as srv, pytest.raises(GenerationHTTPError, match=match):
        OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))


def test_on_result_is_an_optional_keyword_of_the_http_and_hf_backends():
    from alignkit.generation.base import accepts_on_result
    from alignkit.generation.vllm import VLLMGenerator

    gen = OpenAIHTTPGenerator("http://127.0.0.1:1/v1", "m")
    assert accepts_on_result(gen.generate) and accepts_on_result(gen.chat)
    assert accepts_on_result(HFGenerator.generate) and accepts_on_result(HFGenerator.chat)
    assert not accepts_on_result(VLLMGenerator.generate) and not accepts_on_result(len)


def test_update_weights_unsupported_and_bad_args():
    gen = OpenAIHTTPGenerator("http://127.0.0.1:1/v1", "m")
    with pytest.raises(NotImplementedError, match="restart the server"):
        gen.update_weights(None)
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIHTTPGenerator("http://x/v1", "m", max_concurrency=0)
    assert gen.generate([], SamplingParams(max_new_tokens=2)) == []


# ---------------------------------------------------------------------- fake server: per-request results and faults
def test_on_result_delivers_each_request_as_it_finishes():
    """Request 0 is slow: request 1's completion is handed over first, while 0 is still running."""
    delivered = []
    with FakeOpenAIServer(delay_for=lambda body: 0.8 if body["prompt"] == "a" else 0.0) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", max_concurrency=2, **FAST)
        start = time.monotonic()
        out = gen.generate(["a", "b"], SamplingParams(max_new_tokens=2),
                           on_result=lambda i, c: delivered.append((i, c.text, time.monotonic() - start)))
    assert [(i, t) for i, t, _ in delivered] == [(1, "[b] STOP tail"), (0, "[a] STOP tail")]
    assert delivered[0][2] < 0.6 <= delivered[1][2]  # b was handed over while a was still in flight
    assert [c.text for c in out] == ["[a] STOP tail", "[b] STOP tail"]


def test_one_malformed_answer_fails_only_its_request():
    delivered = {}
    script = [Action()] * 3 + [Action(body="{not json")] + [Action()] * 4
    with FakeOpenAIServer(script) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", max_concurrency=1, **FAST)
        out = gen.generate([f"p{i}" for i in range(8)], SamplingParams(max_new_tokens=2),
                           on_result=lambda i, r: delivered.__setitem__(i, r))
    assert len(srv.seen) == 8  # the malformed answer is not retried (the server answered; it is wrong)
    assert isinstance(delivered[3], GenerationHTTPError) and delivered[3].index == 3
    assert "malformed JSON" in str(delivered[3]) and "(request 3)" in str(delivered[3])
    assert [c.text for i, c in sorted(delivered.items()) if i != 3] == [f"[p{i}] STOP tail" for i in range(8) if i != 3]
    assert out[3] is None and gen.stats.requests == 7


def test_truncated_body_is_retried():
    """Content-Length longer than the body: requests raises ChunkedEncodingError; sent again."""
    with FakeOpenAIServer([Action(truncate=True)]) as srv:
        out = OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))
    assert out[0].text == "[x] STOP tail" and len(srv.seen) == 2


def test_dropped_connection_is_retried_and_server_death_fails_the_rest():
    with FakeOpenAIServer([Action(drop=True)]) as srv:
        out = OpenAIHTTPGenerator(srv.base_url, "m", **FAST).generate(["x"], SamplingParams(max_new_tokens=2))
        assert out[0].text == "[x] STOP tail" and len(srv.seen) == 2
    delivered = {}
    with FakeOpenAIServer([Action(), Action(), Action(die=True)]) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", max_concurrency=1, max_retries=1, **FAST)
        gen.generate([f"p{i}" for i in range(5)], SamplingParams(max_new_tokens=2),
                     on_result=lambda i, r: delivered.__setitem__(i, r))
    assert [delivered[i].text for i in (0, 1)] == ["[p0] STOP tail", "[p1] STOP tail"]  # kept
    assert all(isinstance(delivered[i], GenerationHTTPError) for i in (2, 3, 4))
    assert "failed after 2 attempts" in str(delivered[4]) and "ConnectionError" in str(delivered[4])


def test_timed_out_request_is_not_resent():
    with FakeOpenAIServer([Action(delay=1.0)]) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", timeout=0.3, backoff=0.01, max_retries=3)
        with pytest.raises(GenerationHTTPError, match="failed after 1 attempts.*ReadTimeout.*not re-sent"):
            gen.generate(["x"], SamplingParams(max_new_tokens=2))
        time.sleep(0.3)
        assert len(srv.seen) == 1


def test_interrupt_stops_every_worker_and_sends_nothing_after():
    """A KeyboardInterrupt in the caller (here: raised by on_result) returns at once, and the
    workers send no further request, with 10 queued and the server slow. (A send that a worker
    had already begun when the stop was set can arrive a few ms later: GRACE.)"""
    def interrupt(i, result):
        raise KeyboardInterrupt

    with FakeOpenAIServer(default_delay=0.3) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", max_concurrency=2, **FAST)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            gen.generate([str(i) for i in range(12)], SamplingParams(max_new_tokens=2), on_result=interrupt)
        raised = time.monotonic()
        assert raised - start < 0.6 + 0.3  # the first answer (0.3 s) + slack, not 12 * 0.3 / 2
        time.sleep(0.8)
        assert srv.posts_after(raised + GRACE) == 0 and len(srv.seen) <= 4


def test_interrupt_during_backoff_sleep_sends_nothing_after():
    """The stop event also cuts a Retry-After sleep short: no second attempt after Ctrl-C."""
    with FakeOpenAIServer([Action(status=503, body="busy", headers={"Retry-After": "2"})]) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, "m", **FAST)
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            gen.generate(["x"], SamplingParams(max_new_tokens=2))
        assert time.monotonic() - start < 1.0
        time.sleep(2.2)
        assert len(srv.seen) == 1


def test_redirect_is_not_followed():
    with FakeOpenAIServer() as other:
        target = other.base_url + "/completions"
        with FakeOpenAIServer([Action(status=307, body="", headers={"Location": target})]) as srv:
            gen = OpenAIHTTPGenerator(srv.base_url, "m", **FAST)
            with pytest.raises(GenerationHTTPError, match=f"HTTP 307 redirect to {target} not followed"):
                gen.generate(["x"], SamplingParams(max_new_tokens=2))
        assert len(srv.seen) == 1 and other.seen == []  # the prompt never reached the other port


def test_url_credentials_are_sent_as_basic_auth_and_redacted():
    with FakeOpenAIServer([Action(status=400, body={"error": "nope"})]) as srv:
        url = srv.base_url.replace("http://", "http://alice:s3cr%40t@")
        gen = OpenAIHTTPGenerator(url, "m", api_key="ignored-key", **FAST)
        assert gen.base_url == srv.base_url.replace("http://", "http://***@") and "s3cr" not in gen.name
        with pytest.raises(GenerationHTTPError) as info:
            gen.generate(["x"], SamplingParams(max_new_tokens=2))
        assert gen.generate(["y"], SamplingParams(max_new_tokens=2))[0].text == "[y] STOP tail"
    expected = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert [s.headers.get("Authorization") for s in srv.seen] == [expected, expected]
    assert "s3cr" not in str(info.value) and "***@127.0.0.1" in str(info.value) and info.value.index == 0
    assert redact_url("https://u:p@h:1/v1?x=1") == "https://***@h:1/v1?x=1" and redact_url("http://h/v1") == "http://h/v1"


# ---------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    d = build_tiny_llama(tmp_path_factory.mktemp("tiny-served"), initializer_range=0.5)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def real_server(served_dir, tmp_path_factory):
    with transformers_serve(served_dir, tmp_path_factory.mktemp("serve-log") / "serve.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def local_hf(served_dir):
    model = AutoModelForCausalLM.from_pretrained(served_dir, dtype=torch.float32).eval()
    return HFGenerator(model, AutoTokenizer.from_pretrained(served_dir))


@pytest.mark.slow
def test_transformers_serve_completions_match_hf(real_server, local_hf):
    gen = OpenAIHTTPGenerator(real_server.base_url, real_server.model, max_concurrency=2, timeout=120)
    prompts = ["Hello there", "The quick brown fox", "One two three four"]
    params = SamplingParams(max_new_tokens=8)
    remote = gen.generate(prompts, params)
    local = local_hf.generate(prompts, params)
    assert [r.text for r in remote] == [c.text for c in local]
    assert all(r.finish_reason == "length" for r in remote)
    assert gen.stats.generated_tokens == 8 * len(prompts)
    assert [r.prompt_tokens for r in remote] == [c.prompt_tokens for c in local]


@pytest.mark.slow
def test_transformers_serve_chat_matches_hf(real_server, local_hf):
    gen = OpenAIHTTPGenerator(real_server.base_url, real_server.model, timeout=120)
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]]
    params = SamplingParams(max_new_tokens=6)
    remote = gen.chat(convs, params)
    local = local_hf.chat(convs, params)
    assert [r.text for r in remote] == [c.text for c in local]
    # A stop string taken from the local text: the client-side cut gives the same prefix.
    stop = local[0].text[3:6]
    cut = gen.chat(convs[:1], SamplingParams(max_new_tokens=6, stop=[stop]))[0]
    assert cut.text == local[0].text[:local[0].text.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.slow
def test_transformers_serve_on_result_and_url_credentials(real_server, local_hf):
    """Against the real server: each completion handed over by on_result equals the returned one and
    HF's; a URL with credentials (ignored by transformers serve) still works and is shown redacted."""
    url = real_server.base_url.replace("http://", "http://user:pw-secret@")
    gen = OpenAIHTTPGenerator(url, real_server.model, max_concurrency=2, timeout=120)
    assert "pw-secret" not in gen.name and "***@" in gen.base_url
    prompts, params, delivered = ["Hello there", "One two three four"], SamplingParams(max_new_tokens=6), {}
    out = gen.generate(prompts, params, on_result=lambda i, c: delivered.__setitem__(i, c))
    assert [delivered[i].text for i in range(2)] == [c.text for c in out] == [
        c.text for c in local_hf.generate(prompts, params)]
    chats = gen.chat([[{"role": "user", "content": "Hi"}]], params, on_result=lambda i, c: delivered.update(chat=c))
    assert delivered["chat"].text == chats[0].text


@pytest.mark.slow
@pytest.mark.real_model
def test_transformers_serve_smollm2_matches_hf(tmp_path):
    models = pytest.importorskip("alignkit.models")
    source = models.resolve_model(models.DEFAULT_MODEL)
    model, tokenizer, _ = models.load_model(source.path, dtype=torch.float32, device="cpu", for_generation=True)
    local = HFGenerator(model, tokenizer)
    conv = [[{"role": "user", "content": "What is 2 + 3? Answer with a number."}]]
    params = SamplingParams(max_new_tokens=12)
    with transformers_serve(source.path, tmp_path / "serve.log", extra_args=("--dtype", "float32")) as srv:
        gen = OpenAIHTTPGenerator(srv.base_url, srv.model, timeout=180)
        remote_chat = gen.chat(conv, params)
        remote_text = gen.generate(["The capital of France is"], params)
    assert remote_chat[0].text == local.chat(conv, params)[0].text
    assert remote_text[0].text == local.generate(["The capital of France is"], params)[0].text
    assert remote_chat[0].text.strip()  # the real model says something


def test_make_generator_http():
    from alignkit.generation import make_generator

    with FakeOpenAIServer() as srv:
        gen = make_generator(f"{srv.base_url}#served-name", max_retries=0)
        assert isinstance(gen, OpenAIHTTPGenerator) and gen.max_retries == 0
        assert gen.generate(["x"], SamplingParams(max_new_tokens=2))[0].text == "[x] STOP tail"
        assert srv.seen[-1].body["model"] == "served-name"
        assert make_generator(srv.base_url, model="other").model == "other"
    with pytest.raises(ValueError, match="model's name"):
        make_generator("http://127.0.0.1:1/v1")
