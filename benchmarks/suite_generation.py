"""Eval generation and the HTTP backend.

* eval generation: ``HFGenerator(batch_size=8)`` (left-padded batches, KV cache, stop strings) vs the
  same generator one prompt at a time (``batch_size=1``); greedy, so the texts must agree.
* HTTP: ``OpenAIHTTPGenerator`` with a bounded pool of 8 vs ``max_concurrency=1``, against the
  batching test server of ``batching_server.py`` and against ``transformers serve``.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import requests

from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import OpenAIHTTPGenerator

from .batching_server import BatchingServer
from .common import Context, Plot, Row

logger = logging.getLogger("benchmarks")


def gsm8k_prompts(n: int) -> list[str]:
    """``n`` GSM8K test questions in a plain question/answer format."""
    return [f"Question: {e['question']}\nAnswer:" for e in GSM8K(split="test").load(n)]


def _timed(generator, prompts: list[str], params: SamplingParams) -> tuple[list, float]:
    """(completions, wall seconds) of one ``generate`` call."""
    t0 = time.perf_counter()
    out = generator.generate(prompts, params)
    return out, time.perf_counter() - t0


def _agreement(a, b) -> dict:
    same = sum(x.text == y.text for x, y in zip(a, b))
    return {"identical_texts": same, "n": len(a), "ok": len(a) == len(b) and same == len(a)}


def eval_prompts(n: int, max_new_tokens: int) -> tuple[list[str], SamplingParams]:
    """What ``alignkit eval --tasks gsm8k`` sends: the task's zero-shot prompts and greedy params."""
    from alignkit.eval.tasks.gsm8k import GSM8K

    task = GSM8K()
    prompts = [task.format_prompt(ex) for ex in task.load(limit=n)]
    return prompts, task.sampling_params(max_new_tokens=max_new_tokens)


def bench_eval_generation(ctx: Context) -> list[Row]:
    model, tok = ctx.load()
    n = ctx.pick(8, 16)
    prompts, params = eval_prompts(n, ctx.pick(12, 128))
    batched, single = HFGenerator(model, tok, batch_size=8), HFGenerator(model, tok, batch_size=1)
    batched.generate(prompts[:2], params)  # warm-up
    out_b, t_b = _timed(batched, prompts, params)
    out_s, t_s = _timed(single, prompts, params)
    agreement = _agreement(out_b, out_s)
    tokens = sum(c.num_tokens for c in out_b)
    rows = [Row("eval generation: batch 8 (HFGenerator) vs one prompt at a time", n / t_b, n / t_s, "examples/s",
                target=3.0, agreement=agreement,
                details={"n": n, "max_new_tokens": params.max_new_tokens, "new_tokens": tokens,
                         "generated_tokens_per_s": {"batch 8": tokens / t_b,
                                                    "one at a time": sum(c.num_tokens for c in out_s) / t_s}},
                notes=f"GSM8K eval task's zero-shot prompts, greedy, up to {params.max_new_tokens} new tokens, "
                      f"stop strings; {tokens / n:.0f} new tokens per example; texts compared one by one")]
    # eval time vs number of examples (batched path)
    sizes = ctx.pick([2, 4, 8], [4, 8, 16])
    secs = []
    for k in sizes:
        prompts_k, _ = eval_prompts(k, params.max_new_tokens)
        t0 = time.perf_counter()
        batched.generate(prompts_k, params)
        secs.append(time.perf_counter() - t0)
    ctx.plots.append(Plot("eval_time_vs_examples", "Eval generation time vs number of examples (batch 8)",
                          "examples", "seconds", {"HFGenerator batch 8": (sizes, secs)}))
    rows.append(Row("scaling: eval seconds per example, largest vs smallest n", secs[-1] / sizes[-1],
                    secs[0] / sizes[0], "s/example", higher_is_better=False,
                    details={"n": sizes, "seconds": secs}, notes="reported only (plot)"))
    return rows


def _http_pair(url: str, model_name: str, prompts: list[str], params: SamplingParams) -> tuple[float, float, dict]:
    """Seconds for sequential and for pooled (8) requests of the same prompts, and their agreement."""
    seq = OpenAIHTTPGenerator(url, model_name, max_concurrency=1, timeout=600)
    pool = OpenAIHTTPGenerator(url, model_name, max_concurrency=8, timeout=600)
    pool.generate(prompts[:2], params)  # warm-up
    out_p, t_p = _timed(pool, prompts, params)
    out_s, t_s = _timed(seq, prompts, params)
    return t_s, t_p, _agreement(out_p, out_s)


def bench_http(ctx: Context) -> list[Row]:
    model, tok = ctx.load()
    n = ctx.pick(8, 8)
    params = SamplingParams(max_new_tokens=ctx.pick(12, 16), temperature=0.0)
    prompts = gsm8k_prompts(n)
    server = BatchingServer(HFGenerator(model, tok, batch_size=8))
    with server as url:
        t_s, t_p, agreement = _http_pair(url, "bench", prompts, params)
    sizes = server.batch_sizes
    rows = [Row("HTTP backend: pool of 8 vs sequential (local batching server)", n / t_p, n / t_s, "requests/s",
                target=2.0, agreement=agreement,
                details={"n": n, "server_batch_sizes": sizes, "max_new_tokens": params.max_new_tokens},
                notes="server: benchmarks/batching_server.py (HFGenerator, batches requests within 20 ms)")]
    rows.append(bench_transformers_serve(ctx, prompts, params))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_transformers_serve(ctx: Context, prompts: list[str], params: SamplingParams) -> Row:
    """``transformers serve`` (continuous batching, CPU) on the same model: pool vs sequential."""
    name = "HTTP backend: pool of 8 vs sequential (transformers serve --continuous-batching)"
    port = _free_port()
    model_path = str(ctx.model_dir())
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--continuous-batching", "--dtype", "float32"]
    log = open(ctx.workdir / "transformers_serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + ctx.pick(120, 180)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}")
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            raise RuntimeError("no /health answer in time")
        t_s, t_p, agreement = _http_pair(url + "/v1", model_path, prompts, params)
        return Row(name, len(prompts) / t_p, len(prompts) / t_s, "requests/s", target=2.0, agreement=agreement,
                   notes="greedy; transformers serve's own batching on CPU")
    except Exception as err:  # noqa: BLE001 - reported in the row, the log is kept
        tail = (ctx.workdir / "transformers_serve.log").read_text()[-400:]
        logger.warning("transformers serve: %s; log tail: %s", err, tail)
        return Row(name, None, None, "requests/s", target=2.0,
                   notes=f"not measured: {err}; log tail: {tail[-200:]!r}".replace("\n", " "))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
