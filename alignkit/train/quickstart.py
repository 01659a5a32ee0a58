"""The quickstart's data and before/after metrics (``recipes/quickstart.yaml``).

Data, built deterministically from the bundled GSM8K train split (``data.path: quickstart:<name>``):

* ``quickstart:sft``: prompt = question, completion = the solution with ``<<...>>`` calculator
  annotations removed, ending in the fixed answer format ``The answer is N.``
* ``quickstart:dpo``: chosen = that formatted solution; rejected is one of three failure modes (a
  seeded shuffle): an unfinished solution with no answer, the raw unformatted GSM8K answer
  (``<<...>>``, ``#### N``), and looping ``# Answer:`` blocks (what the base model does zero-shot).
* ``quickstart:pairs_heldout``: the same kind of pairs from rows never used for training.

Metrics (:func:`evaluate`), on held-out data: GSM8K (bundled test split) answer-format compliance and
accuracy with greedy decoding (the answer after ``The answer is``, graded by the GSM8K task's one grader,
:meth:`alignkit.eval.tasks.gsm8k.GSM8K.grade`, as eval and the GRPO rewards grade it); preference
accuracy (the model's mean per-token log-prob of chosen > rejected) and the DPO implicit reward
margin/accuracy against the starting model
(``beta * [(log pi(y_w) - log pi_0(y_w)) - (log pi(y_l) - log pi_0(y_l))]``, Rafailov et al. 2023 Eq. 5,
with the recipe's DPO ``beta``).
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import torch

from alignkit.data.io import read_rows, write_json_atomic, write_jsonl_atomic
from alignkit.eval.tasks.gsm8k import GSM8K, gold_answer
from alignkit.generation.base import Generator, SamplingParams
from alignkit.generation.factory import make_generator
from alignkit.losses import sequence_log_probs
from alignkit.models import load_model
from alignkit.resources import data_path

logger = logging.getLogger("alignkit.quickstart")
PREFIX = "quickstart:"
# row ranges of gsm8k/train.jsonl for each built-in set (disjoint, so held-out pairs are unseen)
RANGES = {"sft": (0, 2000), "dpo": (2000, 4000), "pairs_heldout": (7000, 7473)}
ANSWER_RE = re.compile(r"The answer is \$?(-?[\d,]*\.?\d+)")


def _gsm8k_rows(split: str) -> list[dict]:
    """Rows of the bundled GSM8K split (through the package's one reader)."""
    return [row.data for row in read_rows(data_path("gsm8k", f"{split}.jsonl"))]


def split_solution(answer: str) -> tuple[str, str]:
    """GSM8K answer -> (steps without ``<<...>>`` annotations, final number)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '#### N': {answer[:80]!r}")
    steps, final = answer.rsplit("####", 1)
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()
    return steps, final.strip().replace(",", "")


def formatted_solution(answer: str) -> str:
    steps, final = split_solution(answer)
    return f"{steps}\nThe answer is {final}."


def rejected_for(answer: str, kind: int) -> str:
    """One of three bad answers: 0 unfinished (first half of the steps, no answer), 1 the raw GSM8K
    format (``<<...>>`` annotations, ``#### N``), 2 looping ``# Answer:`` blocks."""
    steps, final = split_solution(answer)
    lines = steps.splitlines() or [final]
    if kind == 0:
        return "\n".join(lines[: max(1, len(lines) // 2)])
    if kind == 1:
        return answer
    return "\n".join(["# Answer:", lines[0]] * 3 + ["# Answer:"])


def build(name: str, seed: int = 0) -> list[dict]:
    """Rows of one built-in set (see module doc)."""
    if name not in RANGES:
        raise ValueError(f"unknown quickstart data {name!r}; valid: {', '.join(RANGES)}")
    lo, hi = RANGES[name]
    rows = _gsm8k_rows("train")[lo:hi]
    if name == "sft":
        return [{"prompt": r["question"], "completion": formatted_solution(r["answer"])} for r in rows]
    kinds = list(range(len(rows)))
    random.Random(seed).shuffle(kinds)
    return [{"prompt": r["question"], "chosen": formatted_solution(r["answer"]),
             "rejected": rejected_for(r["answer"], k % 3)} for k, r in zip(kinds, rows)]


def materialize_data(data, out_dir: Path, seed: int = 0) -> None:
    """Replace ``quickstart:<name>`` paths in a ``data`` section by files written under ``out_dir``."""
    for attr in ("path", "eval_path"):
        value = getattr(data, attr)
        if not (isinstance(value, str) and value.startswith(PREFIX)):
            continue
        name = value[len(PREFIX):]
        out = Path(out_dir) / f"quickstart_{name}.jsonl"
        if not out.exists():
            write_jsonl_atomic(out, build(name, seed))
        setattr(data, attr, str(out))


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def parse_answer(text: str) -> str | None:
    """The number after the first ``The answer is``, or None when the format is missing."""
    m = ANSWER_RE.search(text)
    return m.group(1).replace(",", "").rstrip(".") if m else None


def gsm8k_metrics(generator: Generator, n: int, max_new_tokens: int, out: Path) -> dict:
    """Greedy answers of ``generator`` (chat) to the first ``n`` bundled GSM8K test questions: the rate of
    answers in the fixed format and the accuracy (formatted and correct by :meth:`GSM8K.grade`)."""
    rows = _gsm8k_rows("test")[:n]
    conversations = [[{"role": "user", "content": r["question"]}] for r in rows]
    completions = generator.chat(conversations, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    samples, formatted, correct = [], 0, 0
    for row, comp in zip(rows, completions):
        # 1. parse the fixed format; 2. grade it against the gold answer with the task's grader
        pred = parse_answer(comp.text)
        gold = gold_answer(row["answer"])
        formatted += pred is not None
        correct += GSM8K.grade(pred, gold)
        samples.append({"question": row["question"], "gold": gold, "pred": pred, "text": comp.text})
    write_jsonl_atomic(Path(out) / "gsm8k_samples.jsonl", samples)
    return {"gsm8k_format_rate": formatted / len(rows), "gsm8k_accuracy": correct / len(rows)}


def completion_logps(model, tokenizer, pairs: list[dict]):
    """Summed log-probs and token counts of chosen and rejected replies (chat template): 4 x (N,)."""
    device = next(model.parameters()).device
    sums, lens = {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
    for pair in pairs:
        prompt = [{"role": "user", "content": pair["prompt"]}]
        p_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        p_ids = p_ids["input_ids"] if isinstance(p_ids, dict) or hasattr(p_ids, "keys") else p_ids
        for key in ("chosen", "rejected"):
            # 1. prompt + reply tokens; 2. mask = reply positions; 3. summed log-prob of the reply
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": pair[key]}],
                                                 tokenize=True)
            full = full["input_ids"] if hasattr(full, "keys") else full
            ids = torch.tensor([full], device=device)  # (1, T)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(p_ids):] = True
            with torch.no_grad():
                logits = model(ids).logits[:, :-1]  # (1, T-1, V)
            sums[key].append(sequence_log_probs(logits, ids[:, 1:], mask[:, 1:]).item())
            lens[key].append(int(mask[:, 1:].sum()))
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return t(sums["chosen"]), t(sums["rejected"]), t(lens["chosen"]), t(lens["rejected"])


_BASE_CACHE: dict[tuple, tuple] = {}


def preference_metrics(model, tokenizer, base: str, pairs: list[dict], is_base: bool, *,
                       beta: float | None) -> dict:
    """Preference accuracy (own mean log-probs) and implicit reward margin/accuracy vs ``base`` (DPO ``beta``;
    None, when the chain has no DPO stage: preference accuracy only)."""
    c, r, cl, rl = completion_logps(model, tokenizer, pairs)
    accuracy = {"pref_accuracy": float((c / cl > r / rl).double().mean())}
    if beta is None:
        return accuracy
    key = (base, len(pairs))
    if is_base:
        _BASE_CACHE[key] = (c, r)
    if key not in _BASE_CACHE:
        base_model, base_tok, _ = load_model(base)
        _BASE_CACHE[key] = completion_logps(base_model.eval(), base_tok, pairs)[:2]
        del base_model
    c0, r0 = _BASE_CACHE[key]
    margins = beta * ((c - c0) - (r - r0))  # (N,)
    return {**accuracy, "reward_margin": float(margins.mean()),
            "reward_accuracy": float((margins > 0).double().mean())}


def evaluate(model_name: str, base: str, out_dir: Path, *, beta: float | None, questions: int = 16, pairs: int = 32,
             max_new_tokens: int = 96, batch_size: int = 8) -> dict:
    """All quickstart metrics of one model folder/name (``base`` is the starting model; ``beta`` the DPO
    beta of the recipe, which scales the implicit reward margin)."""
    out_dir = Path(out_dir)
    model, tokenizer, _ = load_model(model_name, for_generation=True)
    model.eval()
    logger.info("quickstart eval of %s: %d GSM8K questions, %d held-out pairs", model_name, questions, pairs)
    generator = make_generator(f"hf:{model_name}", model=model, tokenizer=tokenizer, batch_size=batch_size)
    metrics = gsm8k_metrics(generator, questions, max_new_tokens, out_dir)
    held_out = build("pairs_heldout")[:pairs]
    metrics.update(preference_metrics(model, tokenizer, base, held_out, is_base=model_name == base, beta=beta))
    write_json_atomic(out_dir / "quickstart_metrics.json", metrics)
    logger.info("quickstart metrics of %s: %s", model_name, metrics)
    return metrics
