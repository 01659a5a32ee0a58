"""SFT throughput: padding-free and packed batches vs TRL SFTTrainer's padded batches (GSM8K train).

Every path trains the same model with the same AdamW step in one loop, its steps interleaved with the
others' (a load change hits all alike); the batches come from TRL's own tokenization and collator
(``SFTTrainer.get_train_dataloader()``) or from ``PackedSFTDataset``:

* baseline: prompt/completion pairs, ``padding_free=False``: each batch right-padded to its longest row;
* padding-free: the same pairs and batch size, ``padding_free=True``: one row, position ids restart at
  each document, no pad token (TRL's collator; transformers derives a block-diagonal mask from them);
* padding-free + ``sdpa_varlen``: the same batches, attention run per document (``alignkit.attention``)
  instead of over the dense (N, N) block-diagonal mask;
* packed: alignkit's ``PackedSFTDataset`` (CS336: the token stream cut into ``seq_length`` chunks),
  fed as pre-tokenized rows, about the same number of tokens per step.

The loss: TRL paths take the model's own loss (full ``(B, T, V)`` logits, cross-entropy), which on CPU is
faster than the fused LM head SFTTrainer itself runs (TRL 1.16 scores every position off CUDA, with extra
passes for entropy and token accuracy); that head is timed too (``padding-free (TRL, fused head)``), so TRL's
best is the faster of the two. alignkit's paths run what its SFT stage runs: TRL's ``fused_lm_head`` call
answered by ``alignkit.train.compact_head`` (the head on the completion positions only, entropy and token
accuracy in the same tiles).

Real (non-pad) tokens/s counts the tokens each step's forward saw, pads excluded. The loss check
runs the model once on the same documents three ways (padded, padding-free, CS336 packing that
attends across documents) and compares the mean loss over the same predicted tokens.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch
import torch.nn.functional as F
from trl.trainer.utils import add_fused_lm_head

from alignkit.attention import VARLEN_SDPA, register_varlen_sdpa
from alignkit.eval.tasks.gsm8k import GSM8K
from alignkit.resources import prompt
from alignkit.train.compact_head import EXTRA_OUTPUTS, add_compact_lm_head

from .common import Context, Plot, Row, fit_exponent

logger = logging.getLogger("benchmarks")
PF_VARLEN = "padding-free (TRL) + sdpa_varlen"
PF_FUSED = "padding-free (TRL, fused head)"
BFD = "BFD packing (TRL)"
BFD_VARLEN = "BFD packing (TRL) + sdpa_varlen"
#: the paths a TRL user has on CPU (attention sdpa) and the ones alignkit adds or picks by itself
TRL_PATHS = ("padded (TRL)", "padding-free (TRL)", PF_FUSED, BFD)
ALIGNKIT_PATHS = (PF_VARLEN, BFD_VARLEN)
VARLEN_PATHS = (PF_VARLEN, BFD_VARLEN)
#: the loss each path takes: the model's own (full logits), TRL's fused head, alignkit's compact head
HEADS = {PF_FUSED: "trl_fused", PF_VARLEN: "compact", BFD_VARLEN: "compact"}


def gsm8k_pairs(n: int) -> list[dict]:
    """The first ``n`` GSM8K train rows as Alpaca-template prompt/completion pairs (question -> answer)."""
    head, _ = prompt("alpaca_sft").split("{response}")
    return [{"prompt": head.format(instruction=e["question"]), "completion": e["answer"], "question": e["question"]}
            for e in GSM8K(split="train").load(n)]


def doc_ids(tok, pairs: list[dict]) -> list[list[int]]:
    """Whole-document token ids (prompt + completion + EOS), as every path sees them."""
    return [tok(p["prompt"] + p["completion"])["input_ids"] + [tok.eos_token_id] for p in pairs]


# ---------------------------------------------------------------------------------------------- batches
def trl_batches(model, tok, pairs: list[dict], *, batch_size: int, padding_free: bool, workdir,
                packing_length: int | None = None) -> list[dict]:
    """The batches TRL's SFTTrainer would train on (its tokenization, collator and sampler, seed 0).
    ``packing_length``: TRL's BFD packing (``packing: true``, best-fit decreasing into rows of that many
    tokens, padding-free: position ids restart per document)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    packing = packing_length is not None
    args = SFTConfig(
        output_dir=str(workdir), per_device_train_batch_size=batch_size, padding_free=padding_free or packing,
        packing=packing, packing_strategy="bfd", max_length=packing_length, report_to=[], use_cpu=True,
        bf16=False, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    return [dict(b) for b in trainer.get_train_dataloader()]


def packed_batches(tok, pairs: list[dict], *, seq_length: int, rows: int, workdir,
                   position_ids: bool) -> list[dict]:
    """alignkit's PackedSFTDataset over the same pairs (CS336 packing), ``rows`` items per batch."""
    from alignkit.data.sft import PackedSFTDataset, iterate_batches

    path = workdir / "gsm8k_sft_pairs.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"prompt": p["question"], "response": p["completion"]}) + "\n" for p in pairs)
    ds = PackedSFTDataset(tok, path, seq_length, shuffle=False, cache_dir=workdir / "cache",
                          return_position_ids=position_ids)
    return list(iterate_batches(ds, rows, shuffle=False))


def real_tokens(batch: dict) -> int:
    """Non-pad tokens the forward sees: the attention mask's ones, else every token (no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def fused_loss(forward, batch: dict) -> torch.Tensor:
    """SFTTrainer.compute_loss's default path on a fused-head forward: the mean NLL over the scored tokens, and
    its entropy and token-accuracy metrics read back to the host."""
    out = forward(**batch, use_cache=False, fused_lm_head=True)
    n = out.label_mask.sum()
    _ = float(out.entropy.detach().sum() / n), float(out.is_top1.sum() / n)  # TRL logs both every step
    return -out.log_probs.sum() / n.clamp(min=1)


def train_step(model, optimizer, batch: dict, cs336_labels: bool, head: str = "hf", trl_forward=None) -> float:
    """One optimizer step. TRL batches carry ``labels`` the model shifts: the model's own loss (``head="hf"``),
    TRL's fused head (``"trl_fused"``, through ``trl_forward``) or alignkit's compact head (``"compact"``);
    PackedSFTDataset batches (``cs336_labels``) carry next-token labels aligned with ``input_ids``: the loss
    is taken here."""
    if head != "hf":
        loss = fused_loss(trl_forward if head == "trl_fused" else model, batch)
    elif not cs336_labels:
        loss = model(**batch, use_cache=False).loss
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # (B, m, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def bench_sft_throughput(ctx: Context) -> list[Row]:
    from transformers import AutoTokenizer

    batch, steps = ctx.pick((2, 3), (8, 4))  # full: the batch 8 (~40% padding)
    pairs = gsm8k_pairs(batch * steps)
    tok = AutoTokenizer.from_pretrained(ctx.model_dir())
    docs = doc_ids(tok, pairs)
    mean_len = sum(map(len, docs)) / len(docs)
    seq_length = ctx.pick(128, 256)
    rows_per_step = max(1, round(batch * mean_len / seq_length))
    model, tok = ctx.load()
    register_varlen_sdpa()
    # 1. the batches of each path (same documents; same number of examples or about the same tokens)
    variants = {
        "padded (TRL)": trl_batches(model, tok, pairs, batch_size=batch, padding_free=False,
                                    workdir=ctx.workdir / "sft-pad"),
        "padding-free (TRL)": trl_batches(model, tok, pairs, batch_size=batch, padding_free=True,
                                          workdir=ctx.workdir / "sft-pf"),
    }
    # the same padding-free batches, attention split per document (alignkit.attention) instead of
    # transformers' dense (N, N) block-diagonal SDPA mask
    variants[PF_VARLEN] = variants["padding-free (TRL)"]
    # TRL's BFD packing: rows of ~ one padding-free batch's tokens, one row per step (the dense block mask on
    # sdpa; alignkit's SFT stage switches it to sdpa_varlen by itself)
    packing_length = 256 * math.ceil(batch * mean_len / 256)
    variants[BFD] = trl_batches(model, tok, pairs, batch_size=1, padding_free=True, workdir=ctx.workdir / "sft-bfd",
                                packing_length=packing_length)
    variants[BFD_VARLEN] = variants[BFD]
    variants[PF_FUSED] = variants["padding-free (TRL)"]  # what SFTTrainer's compute_loss runs on those rows
    add_fused_lm_head(model, outputs=("log_probs", *EXTRA_OUTPUTS))  # SFTTrainer's, as it installs it
    trl_forward = model.forward
    add_compact_lm_head(model, keyword="fused_lm_head", outputs=EXTRA_OUTPUTS)  # AlignkitSFTTrainer's
    for name, pos in (("packed (PackedSFTDataset)", False), ("packed + position ids", True)):
        variants[name] = packed_batches(tok, pairs, seq_length=seq_length, rows=rows_per_step,
                                        workdir=ctx.workdir, position_ids=pos)
    # 2. train steps, interleaved across paths (a load change on the shared machine hits all alike)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    n_rounds = min(len(b) for b in variants.values())  # BFD has the fewest (its rows hold ~ a batch each)
    secs = {k: 0.0 for k in variants}
    toks = {k: 0 for k in variants}
    for r in range(n_rounds):
        for name, batches in variants.items():
            model.set_attn_implementation(VARLEN_SDPA if name in VARLEN_PATHS else "sdpa")
            t0 = time.perf_counter()
            train_step(model, optimizer, batches[r], cs336_labels=name.startswith("packed"),
                       head=HEADS.get(name, "hf"), trl_forward=trl_forward)
            if r > 0:  # round 0 is warm-up
                secs[name] += time.perf_counter() - t0
                toks[name] += real_tokens(batches[r])
        logger.info("sft: round %d/%d done", r + 1, n_rounds)
    model.set_attn_implementation("sdpa")
    tps = {k: toks[k] / secs[k] for k in variants}
    padded_total = sum(int(b["input_ids"].numel()) for b in variants["padded (TRL)"][1:n_rounds])
    agreement = sft_loss_agreement(model, tok, docs[: min(4, len(docs))])
    agreement.update(head_agreement(model, trl_forward, variants["padding-free (TRL)"][0]))
    agreement["ok"] = agreement["ok"] and agreement["compact_head_ok"]
    common = {"batch_examples": batch, "rounds_timed": n_rounds - 1, "mean_doc_tokens": mean_len,
              "pad_fraction_padded": 1 - toks["padded (TRL)"] / padded_total,
              "seq_length_packed": seq_length, "rows_per_step_packed": rows_per_step,
              "tokens_per_s": tps}
    base = tps["padded (TRL)"]
    trl_best = max(TRL_PATHS, key=tps.get)
    ours_best = max(ALIGNKIT_PATHS, key=tps.get)
    return [
        Row("SFT throughput: alignkit's best vs TRL's best CPU path", tps[ours_best], tps[trl_best], "real tok/s",
            target=1.5, agreement=agreement, details={**common, "trl_best": trl_best, "alignkit_best": ours_best,
                                                      "packing_length_bfd": packing_length},
            notes=f"alignkit: {ours_best} (compact LM head); TRL's best of padded / padding-free / BFD packing "
                  f"(packing: true, rows of {packing_length} tokens) on sdpa, each with the model's own loss, and "
                  f"padding-free with SFTTrainer's fused head: {trl_best}"),
        Row("SFT throughput: BFD packing + sdpa_varlen vs TRL's BFD packing (sdpa)", tps[BFD_VARLEN], tps[BFD],
            "real tok/s", target=1.5, agreement=agreement, details=common,
            notes="the same TRL BFD-packed rows; what alignkit's SFT stage runs for train.packing: true "
                  "(sdpa_varlen chosen by itself when the recipe names no attention; compact LM head) against "
                  "the model's own loss"),
        Row("SFT throughput: SFTTrainer's fused LM head vs the model's own loss (TRL vs TRL, padding-free)",
            tps[PF_FUSED], tps["padding-free (TRL)"], "real tok/s", agreement=agreement, details=common,
            notes="the same padding-free rows on sdpa; TRL 1.16's fused head scores every position off CUDA "
                  "(entropy and is_top1 passes included), the model's own loss builds the full logits"),
        Row("SFT throughput: padding-free (TRL collator, position ids) vs padded", tps["padding-free (TRL)"],
            base, "real tok/s", target=1.3, agreement=agreement, details=common,
            notes=f"same {batch} examples per step; steps interleaved; first round untimed; attn sdpa "
                  "(transformers' dense block-diagonal mask over the whole row)"),
        Row("SFT throughput: padding-free + sdpa_varlen vs padded", tps[PF_VARLEN], base, "real tok/s",
            target=1.3, agreement=agreement, details=common,
            notes="the same TRL padding-free batches; attn_implementation=sdpa_varlen (alignkit.attention: "
                  "causal SDPA per document, the cost of a varlen kernel)"),
        Row("SFT throughput: packed (PackedSFTDataset) vs padded", tps["packed (PackedSFTDataset)"], base,
            "real tok/s", target=1.3, agreement=agreement, details=common,
            notes=f"{rows_per_step} rows x {seq_length} tokens per step; attends across documents "
                  "(loss differs: see agreement.abs_diff_cross_doc)"),
        Row("SFT throughput: packed + position ids vs padded", tps["packed + position ids"], base,
            "real tok/s", target=1.3, agreement=agreement, details=common,
            notes="PackedSFTDataset(return_position_ids=True): attention stays within documents"),
    ]


# ---------------------------------------------------------------------------------------------- same-token loss
def _within_doc_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """Sum and count of CE over positions whose next token is in the same document. ``(1|B, T, V)``."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).double(), ids[:, 1:], reduction="none")  # (B, T-1)
    return float((ce * valid).sum()), int(valid.sum())


@torch.no_grad()
def sft_loss_agreement(model, tok, docs: list[list[int]]) -> dict:
    """Mean loss per predicted token on the same documents: padded, padding-free, cross-document packing."""
    model.eval()
    lens = [len(d) for d in docs]
    width = max(lens)
    pad = tok.pad_token_id
    # 1. padded batch (B, T), attention mask, right padding
    ids = torch.tensor([d + [pad] * (width - len(d)) for d in docs])  # (B, T)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lens])  # (B, T)
    valid = mask[:, 1:].clone()  # (B, T-1) next token exists in the same doc
    s_pad, c_pad = _within_doc_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, valid)
    # 2. padding-free: one row, positions restart per doc; same predictions (next token in the same doc)
    flat = torch.tensor([[t for d in docs for t in d]])  # (1, N)
    pos = torch.tensor([[i for n in lens for i in range(n)]])  # (1, N)
    valid_flat = (pos[:, 1:] != 0).long()  # (1, N-1) drops the predictions across a boundary
    s_pf, c_pf = _within_doc_loss(model(input_ids=flat, position_ids=pos, use_cache=False).logits, flat, valid_flat)
    # 3. CS336 packing: the same row, one causal sequence (attends across documents), same predictions
    s_x, c_x = _within_doc_loss(model(input_ids=flat, use_cache=False).logits, flat, valid_flat)
    # 4. padding-free with attention split per document (sdpa_varlen)
    model.set_attn_implementation(VARLEN_SDPA)
    s_v, _ = _within_doc_loss(model(input_ids=flat, position_ids=pos, use_cache=False).logits, flat, valid_flat)
    model.set_attn_implementation("sdpa")
    assert c_pad == c_pf == c_x, (c_pad, c_pf, c_x)
    loss_pad, loss_pf, loss_x, loss_v = s_pad / c_pad, s_pf / c_pf, s_x / c_x, s_v / c_pf
    worst = max(abs(loss_pf - loss_pad), abs(loss_v - loss_pad))
    return {"loss_padded": loss_pad, "loss_padding_free": loss_pf, "loss_padding_free_varlen": loss_v,
            "loss_cross_doc_packed": loss_x, "tokens": c_pad, "abs_diff_padding_free": abs(loss_pf - loss_pad),
            "abs_diff_varlen": abs(loss_v - loss_pad), "abs_diff_cross_doc": abs(loss_x - loss_pad),
            "tol": 1e-4, "ok": worst <= 1e-4}


@torch.no_grad()
def head_agreement(model, trl_forward, batch: dict) -> dict:
    """The compact head's loss, entropy and token accuracy on one padding-free batch against TRL's fused head and
    the model's own loss (sdpa_varlen)."""
    model.eval()
    model.set_attn_implementation(VARLEN_SDPA)
    ours = model(**batch, use_cache=False, fused_lm_head=True)
    theirs = trl_forward(**batch, use_cache=False, fused_lm_head=True)
    own = float(model(**batch, use_cache=False).loss)
    model.set_attn_implementation("sdpa")
    model.train()
    n = float(ours.label_mask.sum())
    loss, loss_trl = float(ours.loss), float(theirs.loss)
    acc, acc_trl = float(ours.is_top1.sum()) / n, float(theirs.is_top1.sum()) / n
    ent_diff = float((ours.entropy - theirs.entropy).abs().max())
    # an argmax may flip on a near tie between two float32 tilings: at most one token apart
    ok = abs(loss - own) <= 1e-4 and abs(loss - loss_trl) <= 1e-4 and ent_diff <= 1e-3 and abs(acc - acc_trl) * n <= 1
    return {"loss_compact_head": loss, "loss_trl_fused_head": loss_trl, "loss_model": own,
            "token_accuracy_compact": acc, "token_accuracy_trl": acc_trl, "entropy_max_abs_diff": ent_diff,
            "compact_head_ok": ok}


# ---------------------------------------------------------------------------------------------- scaling
def bench_sft_scaling(ctx: Context) -> list[Row]:
    """Seconds per training step (forward + backward) as the work grows: sequence length at batch 1 and
    batch size at a fixed length, on log-log plots with the fitted exponent (1: linear)."""
    model, _ = ctx.load()
    vocab = model.config.vocab_size
    seqs = ctx.pick([32, 64, 128], [128, 256, 512, 1024, 2048])
    batches = ctx.pick([1, 2, 4], [1, 2, 4, 8])

    def step_seconds(b: int, t: int) -> float:
        x = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))  # (B, T)
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step_seconds(1, seqs[0])  # warm-up
    by_seq = [step_seconds(1, t) for t in seqs]
    t_fixed = ctx.pick(32, 128)
    by_batch = [step_seconds(b, t_fixed) for b in batches]
    k_seq, k_batch = fit_exponent(seqs, by_seq), fit_exponent(batches, by_batch)
    ctx.plots.append(Plot("sft_step_seconds_vs_seq_len", "SFT step time vs sequence length (batch 1)",
                          "sequence length", "seconds per step (fwd+bwd)", {"batch 1": (seqs, by_seq)}, loglog=True))
    ctx.plots.append(Plot("sft_step_seconds_vs_batch", f"SFT step time vs batch size (T={t_fixed})",
                          "batch size", "seconds per step (fwd+bwd)", {f"T={t_fixed}": (batches, by_batch)},
                          loglog=True))
    tokens_per_s = [t / s for t, s in zip(seqs, by_seq)]
    return [
        Row("scaling: SFT step time vs sequence length (fitted exponent)", k_seq, None, "exponent",
            details={"seq_lens": seqs, "seconds": by_seq, "tokens_per_s": tokens_per_s},
            notes=f"log-log fit over T={seqs[0]}..{seqs[-1]} (1: linear; attention's T^2 shows above 1); "
                  f"{tokens_per_s[0]:.0f} -> {tokens_per_s[-1]:.0f} tok/s"),
        Row("scaling: SFT step time vs batch size (fitted exponent)", k_batch, None, "exponent",
            details={"batches": batches, "seconds": by_batch, "seq_len": t_fixed},
            notes=f"log-log fit over B={batches[0]}..{batches[-1]} at T={t_fixed} (below 1: small batches "
                  "leave the cores idle)"),
    ]
