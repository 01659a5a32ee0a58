"""Data loading (cached token stream vs re-tokenizing); the GRPO benchmark is in ``suite_grpo``.

* data: ``PackedSFTDataset`` tokenizes a file once and caches the token stream; the baseline
  re-tokenizes every epoch (``cache_dir=False``). Second-epoch cost, and tokenization time vs rows.
"""
from __future__ import annotations

import json
import logging
import time

import torch

from alignkit.resources import data_path

from .common import Context, Plot, Row, fit_exponent

logger = logging.getLogger("benchmarks")


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
