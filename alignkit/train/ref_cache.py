"""On-disk cache of precomputed DPO reference log-probs (``train.ref_cache_dir``).

TRL's ``precompute_ref_log_probs`` runs one reference forward over the whole dataset in the trainer's
``__init__``; its own cache lives in the dataset's cache files (a temporary folder for in-memory datasets,
gone with the process). This cache keeps the per-pair values in ``<dir>/<key>.json`` (atomic writer
``alignkit.data.io.write_json_atomic``) so later runs on the same reference and data skip the pass: a beta
sweep, another learning rate, a resumed or repeated run.

The key (:func:`cache_key`) is a SHA-256 over everything the values depend on: the reference weights
(TRL's ``hash_module`` of the reference, computed by TRL anyway when precomputing), the tokenizer (vocabulary,
special tokens), the tokenized dataset (``prompt_ids``/``chosen_ids``/``rejected_ids`` of every row, in
order), ``max_length`` / ``truncation_mode``, ``ld_alpha`` (TRL's LD-DPO weighting of the reference sums) and
the precision (model dtype, bf16/fp16 autocast). Beta, the loss and the optimiser are not in it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from alignkit.data.io import write_json_atomic

logger = logging.getLogger("alignkit.train")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
FORMAT = 1


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/alignkit/ref_logps`` (``~/.cache/alignkit/ref_logps``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alignkit" / "ref_logps"


def resolve_dir(setting: str | None) -> Path | None:
    """The cache folder for ``train.ref_cache_dir``: unset -> :func:`default_dir`, ``"off"`` -> None."""
    if setting is None:
        return default_dir()
    if str(setting).lower() in {"off", "none", "false", ""}:
        return None
    return Path(setting).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the vocabulary and the special tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """SHA-256 of the tokenized columns of every row, in order."""
    h = hashlib.sha256()
    for column in TOKEN_COLUMNS:
        h.update(column.encode())
        for ids in dataset[column]:
            h.update(json.dumps(list(ids)).encode())
            h.update(b"\n")
    return h.hexdigest()


def cache_key(*, model_hash: str, tokenizer, dataset, settings: dict) -> str:
    """The cache key (module docstring): ``settings`` = max_length, truncation_mode, ld_alpha, precision."""
    parts = {"format": FORMAT, "model": model_hash, "tokenizer": tokenizer_fingerprint(tokenizer),
             "data": dataset_fingerprint(dataset), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load(folder: Path, key: str, n_rows: int) -> tuple[list[float], list[float]] | None:
    """``(ref_chosen_logps, ref_rejected_logps)`` cached under ``key``, or None (absent, unreadable, other size)."""
    path = Path(folder) / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    chosen, rejected = data.get("ref_chosen_logps"), data.get("ref_rejected_logps")
    if data.get("key") != key or not isinstance(chosen, list) or not isinstance(rejected, list) \
            or len(chosen) != n_rows or len(rejected) != n_rows:
        logger.warning("reference log-prob cache %s does not match its key or dataset size; recomputing", path)
        return None
    return chosen, rejected


def save(folder: Path, key: str, chosen: list[float], rejected: list[float], meta: dict) -> Path:
    """Write the values under ``key`` (atomic); returns the file."""
    path = Path(folder) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, {"key": key, "meta": meta, "ref_chosen_logps": chosen,
                                    "ref_rejected_logps": rejected})
