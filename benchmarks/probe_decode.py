"""Where a decode step's time goes at batch 8, and what n-gram speculation could save (analysis, not a row).

``python -m benchmarks.probe_decode`` (SmolLM2-135M, fp32, ~4 minutes on two idle cores) prints:

1. a plain decode step's wall time against the rows in the batch (1, 4, 8, 16) and, at batch 8, against the
   query tokens per row (1 = plain decode; q > 1 = the row's last token plus q - 1 draft tokens verified in
   the same forward), after a 192-token prefill;
2. on the eval tasks' chat prompts (AlpacaEval 16, GSM8K 24; greedy, 256 tokens): static batched generate (the
   benchmark's baseline) against HFGenerator, with the number of model forwards and the time inside them;
3. prompt-lookup (n-gram) speculation on those greedy outputs: a draft of up to k tokens copied from where the
   row's last n tokens (n = 4..1) occurred before in its prompt or output; tokens gained per verify step, and
   the gain of verifying drafts in lockstep batches of 8 at the step costs of (1);
4. the share of a plain decode step spent in matrix multiplies (torch profiler, self CPU time of ``aten::mm``).

It backs the eval-generation paragraph of ``benchmarks/analysis.md``: what a scheduler or a draft can and cannot
win on this CPU.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from alignkit.eval.tasks.alpaca_eval import AlpacaEval
from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import HFGenerator

from .common import set_threads, smollm2_dir
from .suite_dpo import ForwardClock
from .suite_generation import chat_texts, static_generate

BATCH, PREFILL, MAX_Q = 8, 192, 5


def _cache_copy(model, cache) -> DynamicCache:
    out = DynamicCache(config=model.config)
    for mine, theirs in zip(out.layers, cache.layers):
        mine.lazy_initialization(theirs.keys, theirs.values)
        mine.keys, mine.values = theirs.keys.clone(), theirs.values.clone()
    return out


def _prefilled(model, rows: int) -> DynamicCache:
    """A cache of ``rows`` random PREFILL-token prompts."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(100, 10_000, (rows, PREFILL)), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    return cache


def _step(model, q: int, cache) -> None:
    """One forward of (rows, q) new tokens over ``cache`` (a PREFILL-token cache), logits for all q."""
    rows = cache.layers[0].keys.shape[0]
    ids = torch.randint(100, 10_000, (rows, q))
    mask = torch.ones(rows, PREFILL + q, dtype=torch.long)
    pos = torch.arange(PREFILL, PREFILL + q)[None].expand(rows, -1)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
          logits_to_keep=q)


def step_seconds(model, q: int, cache, reps: int = 5) -> float:
    """Median seconds of :func:`_step` over copies of ``cache``."""
    times = []
    for _ in range(reps):
        c = _cache_copy(model, cache)
        t0 = time.perf_counter()
        _step(model, q, c)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gemm_share(model, cache) -> float:
    """Fraction of a plain decode step's self CPU time spent in ``aten::mm`` (8 steps, the forwards only)."""
    copies = [_cache_copy(model, cache) for _ in range(8)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for c in copies:
            _step(model, 1, c)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / total


def draft(context: list[int], k: int) -> list[int]:
    """Prompt lookup: the k tokens after the latest earlier occurrence of the context's last n tokens (n = 4..1)."""
    for n in range(4, 0, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def speculation(rows: list[tuple[list[int], list[int]]], k: int, cost: dict[int, float]) -> tuple[float, float]:
    """(tokens per verify step, time gain in lockstep batches of BATCH) for drafts of up to k tokens, replaying the
    greedy outputs: a row accepts the draft's longest matching prefix plus the one token the model picks."""
    steps = tokens = 0
    plain = spec = 0.0
    for b in range(0, len(rows), BATCH):
        group = rows[b:b + BATCH]
        done = [0] * len(group)
        plain += cost[1] * max(len(out) for _, out in group)  # one token per step until the longest row ends
        while any(d < len(out) for d, (_, out) in zip(done, group)):
            q = 1
            for i, (prompt, out) in enumerate(group):
                if done[i] >= len(out):
                    continue
                guess = draft(prompt + out[:done[i]], min(k, len(out) - done[i] - 1))
                q = max(q, 1 + len(guess))
                accepted = next((a for a, (g, t) in enumerate(zip(guess, out[done[i]:])) if g != t), len(guess))
                done[i] += accepted + 1
                steps += 1
            spec += cost[q]
        tokens += sum(len(out) for _, out in group)
    return tokens / steps, plain / spec


def in_forwards(model, fn) -> tuple[object, int, float, float]:
    """(fn's result, no-grad forwards of ``model`` it ran, seconds inside them, seconds in all)."""
    clock = ForwardClock()
    clock.attach(model)
    try:
        t0 = time.perf_counter()
        out = fn()
        return out, clock.calls[False], clock.seconds[False], time.perf_counter() - t0
    finally:
        clock.detach()


def _generation(model, tok, task, n: int, cost: dict[int, float]) -> None:
    """Static batched generate vs HFGenerator on ``n`` prompts of ``task`` (forward counts and time), then the
    prompt-lookup replay on HFGenerator's greedy outputs."""
    texts, params = chat_texts(tok, task, n), task.sampling_params("chat", 256)
    gen = HFGenerator(model, tok, batch_size=BATCH)
    gen.generate(texts[:2], SamplingParams(max_new_tokens=2, stop=params.stop))  # warm-up
    static_generate(model, tok, texts[:2], SamplingParams(max_new_tokens=2, stop=params.stop), BATCH)
    _, n_s, f_s, t_s = in_forwards(model, lambda: static_generate(model, tok, texts, params, BATCH))
    outs, n_a, f_a, t_a = in_forwards(model, lambda: gen.generate(texts, params))
    print(f"{task.name}: static generate {t_s:.1f} s ({n_s} forwards, {1000 * f_s / n_s:.1f} ms each, "
          f"{t_s - f_s:.1f} s outside); HFGenerator {t_a:.1f} s ({n_a} forwards, {1000 * f_a / n_a:.1f} ms each, "
          f"{t_a - f_a:.1f} s outside): {t_s / t_a:.2f}x; {sum(c.num_tokens for c in outs)} new tokens")
    rows = [(tok(t, add_special_tokens=False)["input_ids"], c.token_ids) for t, c in zip(texts, outs)]
    for k in range(1, MAX_Q):
        per_step, gain = speculation(rows, k, cost)
        print(f"{task.name}: drafts of up to {k} tokens: {per_step:.2f} tokens per verify step, "
              f"{gain:.2f}x in lockstep batches of {BATCH}")


def main() -> None:
    set_threads()
    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.inference_mode():
        cache = _prefilled(model, BATCH)
        step_seconds(model, 1, cache, reps=2)  # warm-up
        cost = {q: step_seconds(model, q, cache) for q in range(1, MAX_Q + 1)}
        by_rows = {rows: step_seconds(model, 1, _prefilled(model, rows)) for rows in (1, 4, 16)}
        print("plain decode step, ms by rows: " + ", ".join(
            f"{rows}: {1000 * s:.1f}" for rows, s in sorted({**by_rows, BATCH: cost[1]}.items())))
        print(f"decode step at batch {BATCH} (prefill {PREFILL}), ms by query tokens per row: "
              + ", ".join(f"q={q}: {1000 * s:.1f}" for q, s in cost.items()))
        for task, n in ((AlpacaEval(), 16), (GSM8K(), 24)):
            _generation(model, tok, task, n, cost)
        share = gemm_share(model, cache)  # last: the profiler slows the steps that follow it
    print(f"matrix multiplies (aten::mm): {share:.0%} of a plain decode step's CPU time")


if __name__ == "__main__":
    main()
