"""Eval generation and the HTTP backend.

* eval generation: ``HFGenerator(batch_size=8)`` (continuous batching: a finished row leaves the batch and
  its slot takes the next prompt; longest first; the shared prompt prefix prefilled once) vs the static
  batched ``model.generate`` a user writes (dataset order, batch 8, left padding, ``stop_strings``), on
  the GSM8K and AlpacaEval eval tasks' chat prompts; and vs ``model.generate`` one prompt at a time.
  Greedy, so the texts must be identical one by one.
* HTTP: ``OpenAIHTTPGenerator`` with a bounded pool of 8 vs ``max_concurrency=1``, against the
  batching test server of ``batching_server.py`` and against ``transformers serve``.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import time

import requests
import torch
from transformers import GenerationConfig

from alignkit.eval.tasks.alpaca_eval import AlpacaEval
from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.generation.base import SamplingParams, truncate_at_stop
from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import OpenAIHTTPGenerator

from .batching_server import BatchingServer
from .common import Context, Row, timed

logger = logging.getLogger("benchmarks")


def gsm8k_prompts(n: int) -> list[str]:
    """``n`` GSM8K test questions in a plain question/answer format."""
    return [f"Question: {e['question']}\nAnswer:" for e in GSM8K(split="test").load(n)]


def _agreement(a, b) -> dict:
    same = sum(x.text == y.text for x, y in zip(a, b))
    return {"identical_texts": same, "n": len(a), "ok": len(a) == len(b) and same == len(a)}


def _text_agreement(ours: list[str], theirs: list[str]) -> dict:
    """Texts compared one by one: ``ok`` only when every one is identical (differing indices listed)."""
    differ = [i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y]
    return {"identical_texts": len(ours) - len(differ), "n": len(ours), "differ": differ,
            "ok": len(ours) == len(theirs) and not differ}


def eval_prompts(n: int, max_new_tokens: int) -> tuple[list[str], SamplingParams]:
    """What ``alignkit eval --tasks gsm8k`` sends: the task's zero-shot prompts and greedy params."""
    task = GSM8K()
    prompts = [task.format_prompt(ex) for ex in task.load(limit=n)]
    return prompts, task.sampling_params(max_new_tokens=max_new_tokens)


PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_texts(tok, task, n: int) -> list[str]:
    """The first ``n`` prompts of ``task`` in the ``chat`` style, through the tokenizer's chat template."""
    return [tok.apply_chat_template(task.format_prompt(e, "chat"), add_generation_prompt=True, tokenize=False)
            for e in task.load(limit=n)]


def static_generate(model, tok, texts: list[str], params: SamplingParams, batch_size: int) -> list[str]:
    """The baseline a user writes: ``model.generate`` on batches of ``batch_size`` prompts in dataset order,
    left-padded, greedy, ``stop_strings``; texts cut at the first EOS and at the stop string."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id, stop_strings=params.stop or None)
    texts_out = []
    with torch.inference_mode():
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b:b + batch_size], padding=True, padding_side="left", add_special_tokens=False,
                      return_tensors="pt")
            out = model.generate(**enc, generation_config=config, tokenizer=tok)  # (B, T + N)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                row = row[:next((k for k, t in enumerate(row) if t in eos), len(row))]
                texts_out.append(truncate_at_stop(tok.decode(row, skip_special_tokens=True), params.stop)[0])
    return texts_out


def _timed_static(model, tok, texts: list[str], params: SamplingParams) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = static_generate(model, tok, texts, params, batch_size=8)
    return out, time.perf_counter() - t0


def _eval_tasks(ctx: Context) -> list[tuple[str, object, int, int]]:
    """(label, task, prompts, max_new_tokens) of the generation rows: more prompts than the batch's 8 slots,
    so that freed slots are refilled (about 6 minutes in all at full size on two idle cores)."""
    return [("GSM8K", GSM8K(), ctx.pick(10, 24), ctx.pick(16, 256)),
            ("AlpacaEval", AlpacaEval(), ctx.pick(10, 16), ctx.pick(16, 256))]


def bench_eval_generation(ctx: Context) -> list[Row]:
    """alignkit's ``HFGenerator`` (continuous batching, longest first, shared prefix prefilled once) vs static
    batched ``model.generate`` in dataset order, batch 8, on the GSM8K and AlpacaEval eval tasks' chat prompts
    (greedy, the task's stop strings); and vs ``model.generate`` one prompt at a time on the first few."""
    model, tok = ctx.load()
    model.eval()
    if not tok.chat_template:  # the tiny smoke model's GPT-2 tokenizer
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    n_ref = 2
    gen = HFGenerator(model, tok, batch_size=8)
    rows, ours_all, ref_all, t_ours_all, t_ref_all = [], [], [], 0.0, 0.0
    tasks = _eval_tasks(ctx)
    for label, task, n, max_new in tasks:
        texts, params = chat_texts(tok, task, n), task.sampling_params("chat", max_new)
        static_generate(model, tok, texts[:2], SamplingParams(max_new_tokens=2, stop=params.stop), 8)  # warm-up
        gen.generate(texts[:2], SamplingParams(max_new_tokens=2, stop=params.stop))
        # Alternate which path runs first (load changes on a shared machine hit both alike).
        first_static = len(rows) % 2 == 0
        if first_static:
            theirs, t_static = _timed_static(model, tok, texts, params)
        t_ours, ours = timed(functools.partial(gen.generate, texts, params))
        if not first_static:
            theirs, t_static = _timed_static(model, tok, texts, params)
        t0 = time.perf_counter()
        ref_all += static_generate(model, tok, texts[:n_ref], params, batch_size=1)
        t_ref_all += time.perf_counter() - t0
        ours_all += [c.text for c in ours[:n_ref]]
        t_ours_all += t_ours
        lengths = [c.num_tokens for c in ours]
        rows.append(Row(f"eval generation ({label}): alignkit vs static batched generate", n / t_ours, n / t_static,
                        "examples/s", target=1.5, agreement=_text_agreement([c.text for c in ours], theirs),
                        details={"n": n, "max_new_tokens": max_new, "new_tokens": lengths,
                                 "finish_reasons": [c.finish_reason for c in ours],
                                 "seconds": {"alignkit": t_ours, "static batched generate": t_static}},
                        notes=f"{task.name} chat prompts, greedy, batch 8 both; baseline: model.generate in dataset "
                              f"order, left-padded, stop_strings; {sum(lengths) / n:.0f} new tokens per example "
                              f"(min {min(lengths)}, max {max(lengths)}); texts compared one by one"))
    k, n_all = len(ref_all), sum(t[2] for t in tasks)
    rows.append(Row("eval generation: alignkit vs one prompt at a time (reference)", n_all / t_ours_all,
                    k / t_ref_all, "examples/s", agreement=_text_agreement(ours_all, ref_all),
                    details={"n_one_at_a_time": k, "n_alignkit": n_all},
                    notes=f"model.generate one prompt at a time on the first {n_ref} prompts of each task; "
                          "alignkit's texts of those prompts compared one by one; reported only"))
    return rows


def _http_pair(url: str, model_name: str, prompts: list[str], params: SamplingParams) -> tuple[float, float, dict]:
    """Seconds for sequential and for pooled (8) requests of the same prompts, and their agreement."""
    seq = OpenAIHTTPGenerator(url, model_name, max_concurrency=1, timeout=600)
    pool = OpenAIHTTPGenerator(url, model_name, max_concurrency=8, timeout=600)
    pool.generate(prompts[:2], params)  # warm-up
    t_p, out_p = timed(lambda: pool.generate(prompts, params))
    t_s, out_s = timed(lambda: seq.generate(prompts, params))
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
