"""GRPO step time split and data loading (cached token stream vs re-tokenizing).

* GRPO (Shao et al. 2024): one ``alignkit.rl.loop.GRPOLoop.train_step`` (grpo_clip, so the old
  log-probs pass runs) on GSM8K prompts with ``HFGenerator`` sharing the policy; the loop's own
  time split: generation vs no-grad log-probs vs forward+backward, and tokens/s of each.
* data: ``PackedSFTDataset`` tokenizes a file once and caches the token stream; the baseline
  re-tokenizes every epoch (``cache_dir=False``). Second-epoch cost, and tokenization time vs rows.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch

from alignkit.resources import data_path

from .common import Context, Plot, Row, fit_exponent

logger = logging.getLogger("benchmarks")


def bench_grpo(ctx: Context) -> list[Row]:
    from alignkit.generation.hf import HFGenerator
    from alignkit.rl.loop import GRPOConfig, GRPOLoop
    from alignkit.rl.rewards import gsm8k_reward

    model, tok = ctx.load()
    with open(data_path("gsm8k", "train.jsonl")) as fh:
        rows = [json.loads(line) for line, _ in zip(fh, range(16))]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    settings = GRPOConfig(n_grpo_steps=1, rollout_batch_size=ctx.pick(4, 4), group_size=ctx.pick(2, 2),
                            train_batch_size=ctx.pick(4, 4), gradient_accumulation_steps=ctx.pick(2, 2),
                            loss_type="grpo_clip", max_new_tokens=ctx.pick(8, 16), min_new_tokens=1,
                            rollout_table_every=0, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    loop = GRPOLoop(model, tok, HFGenerator(model, tok, batch_size=8), gsm8k_reward, prompts,
                    [r["answer"] for r in rows], opt, settings)
    t0 = time.perf_counter()
    m = loop.train_step()
    wall = time.perf_counter() - t0
    split = {k: m[k] for k in ("time_generation_s", "time_log_probs_s", "time_train_s")}
    ok = math.isfinite(m["loss"]) and sum(split.values()) <= wall * 1.01
    details = {**split, "wall_s": wall, "loss": m["loss"],
               **{k: m[k] for k in ("generation_tokens_per_s", "log_prob_tokens_per_s", "train_tokens_per_s")},
               "settings": {k: getattr(settings, k) for k in ("rollout_batch_size", "group_size",
                                                             "gradient_accumulation_steps", "max_new_tokens")}}
    agreement = {"loss": m["loss"], "split_sum_s": sum(split.values()), "wall_s": wall, "ok": ok}
    shares = ", ".join(f"{k[5:-2]} {100 * v / wall:.0f}%" for k, v in split.items())
    return [Row(f"GRPO step: {name}", m[key], None, "tok/s", agreement=agreement, details=details,
                notes=f"{m[tkey]:.2f} s of a {wall:.2f} s step ({shares})" if name == "generation" else
                f"{m[tkey]:.2f} s")
            for name, key, tkey in (("generation", "generation_tokens_per_s", "time_generation_s"),
                                    ("old log-probs (no grad)", "log_prob_tokens_per_s", "time_log_probs_s"),
                                    ("forward + backward", "train_tokens_per_s", "time_train_s"))]


def _write_rows(path, n: int) -> None:
    """``n`` {"prompt", "response"} rows cycling through GSM8K train."""
    with open(data_path("gsm8k", "train.jsonl")) as fh:
        src = [json.loads(line) for line in fh]
    with open(path, "w") as fh:
        for i in range(n):
            r = src[i % len(src)]
            fh.write(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n")


def bench_data_loading(ctx: Context) -> list[Row]:
    from alignkit.data.sft import PackedSFTDataset

    _, tok = ctx.load()
    seq = 256
    sizes = ctx.pick([100, 1000, 3000], [1000, 10000, 100000])
    first_epoch, cached_epoch = [], []
    for n in sizes:
        path = ctx.workdir / f"rows_{n}.jsonl"
        _write_rows(path, n)
        cache = ctx.workdir / f"cache_{n}"
        # 1. epoch 1: tokenize and cache; 2. epoch 2: a new dataset over the same file hits the cache
        t0 = time.perf_counter()
        ds1 = PackedSFTDataset(tok, path, seq, shuffle=False, cache_dir=cache)
        first_epoch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ds2 = PackedSFTDataset(tok, path, seq, shuffle=True, seed=1, cache_dir=cache)
        cached_epoch.append(time.perf_counter() - t0)
        logger.info("data: %d rows: tokenize %.2fs, cached epoch %.3fs", n, first_epoch[-1], cached_epoch[-1])
        if n == sizes[1]:  # baseline on the middle file: re-tokenize (no cache), same shuffled order as ds2
            t0 = time.perf_counter()
            ds_re = PackedSFTDataset(tok, path, seq, shuffle=True, seed=1, cache_dir=False)
            retok = time.perf_counter() - t0
            same = torch.equal(ds2.ids, ds_re.ids) and ds1.num_documents == ds_re.num_documents == n
            cached_mid = cached_epoch[-1]
    per_row = [t / n for t, n in zip(first_epoch, sizes)]
    ctx.plots.append(Plot("data_tokenize_time_vs_rows", "PackedSFTDataset build time vs file size",
                          "rows", "seconds", {"epoch 1 (tokenize + cache)": (sizes, first_epoch),
                                              "epoch 2 (cache hit)": (sizes, cached_epoch)}, loglog=True))
    return [
        Row("data loading: epoch 2 with cached token stream vs re-tokenizing", cached_mid, retok, "s",
            higher_is_better=False, agreement={"same_token_stream": same, "ok": same},
            details={"rows": sizes[1], "seq_length": seq},
            notes="target: epoch 2 tokenization cost ~ 0 (cache hit loads .npy and reorders documents)"),
        Row("scaling: data tokenize time vs rows (fitted exponent)", fit_exponent(sizes, first_epoch), None,
            "exponent", details={"rows": sizes, "first_epoch_s": first_epoch, "cached_epoch_s": cached_epoch,
                                 "seconds_per_row": per_row},
            notes=f"log-log fit over {sizes[0]}..{sizes[-1]} rows (1: linear in rows); cache-hit epochs: "
                  f"exponent {fit_exponent(sizes, cached_epoch):.2f}"),
    ]
