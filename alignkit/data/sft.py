"""Packed SFT data (CS336 A5 supplement section 3.2.1): Alpaca-formatted documents, one token stream, fixed-length
next-token chunks.

Each ``{"prompt", "response"}`` row of a JSONL (or ``.jsonl.gz``) file becomes
``resources.prompt("alpaca_sft").format(instruction=prompt, response=response)`` cut right after the response
(the prompt file's final newline is not part of the document), tokenized with the tokenizer's default special
tokens (a BOS-adding tokenizer keeps its BOS), then ``eos_token_id``. Documents are concatenated
in file order (or a seeded shuffled order) and cut into items ``input_ids = ids[i*m:(i+1)*m]``,
``labels = ids[i*m+1:(i+1)*m+1]``; the incomplete tail is dropped.

Tokenization is done once per (file content, tokenizer, template) and cached as two ``.npy`` files (the
concatenated per-document tokens and their offsets) under ``cache_dir`` (default ``$ALIGNKIT_CACHE`` or
``~/.cache/alignkit``, sub-folder ``packed_sft``). Shuffling reorders cached documents; it never re-tokenizes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alignkit.data.io import DataError, atomic_path, location, read_rows
from alignkit.resources import prompt as bundled_prompt

logger = logging.getLogger(__name__)

CACHE_FORMAT = "packed-sft-v2"  # v2: nothing after {response} (EOS follows the response)
FIELDS = ("prompt", "response")


def default_cache_dir() -> Path:
    """``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit")).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: class, vocabulary/merges/post-processor, special tokens.

    Fast tokenizers hash their full serialized state (``backend_tokenizer.to_str()``); others their vocab.
    Does not tokenize anything.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _field_problem(data: dict, name: str) -> str | None:
    if name not in data:
        return f"missing (columns present: {', '.join(map(str, data))})"
    if not isinstance(data[name], str):
        return f"expected a string, got {type(data[name]).__name__}"
    return "empty text" if not data[name].strip() else None


def through_response(template: str) -> str:
    """``template`` up to and including its ``{response}`` slot: what follows it in the prompt file (the
    final newline of ``alpaca_sft.prompt``) is not part of a document, so the response's last token is
    followed directly by EOS, as in the CS336 reference's tokenized fixture (``..., 13, 128001, 128000``)."""
    slot = "{response}"
    return template[: template.index(slot) + len(slot)] if slot in template else template


def read_sft_texts(path: Path, template: str) -> list[str]:
    """The formatted documents of ``path``; a :class:`DataError` names file, line and field of a bad row."""
    texts: list[str] = []
    for row in read_rows(path):
        # 1. both fields present, strings, not blank; 2. format with the template
        for name in FIELDS:
            problem = _field_problem(row.data, name)
            if problem:
                raise DataError(f"{location(row.source, row.line)}: field {name!r}: {problem} "
                                f"({len(texts)} rows were read before it)",
                                source=row.source, line=row.line, field=name)
        texts.append(template.format(instruction=row.data["prompt"], response=row.data["response"]))
    if not texts:
        raise DataError(f"{path}: no rows", source=str(path))
    return texts


def tokenize_documents(tokenizer, texts: list[str], batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` in batches, each followed by EOS. Returns (tokens (N,), offsets (D + 1,))."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("PackedSFTDataset: the tokenizer has no eos_token_id (needed as document delimiter)")
    pieces, lengths, start = [], [], time.monotonic()
    for first in range(0, len(texts), batch_size):
        # 1. one batch through the (fast) tokenizer; 2. append EOS to each document
        for ids in tokenizer(texts[first : first + batch_size])["input_ids"]:
            pieces.append(np.asarray(list(ids) + [eos], dtype=np.int64))
            lengths.append(len(ids) + 1)
        done = min(first + batch_size, len(texts))
        if done == len(texts) or (first // batch_size) % 20 == 19:
            logger.info("tokenized %d/%d documents (%.1fs)", done, len(texts), time.monotonic() - start)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.int32 if max(len(tokenizer), eos + 1) < 2**31 else np.int64
    return np.concatenate(pieces).astype(dtype), offsets


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


class PackedSFTDataset(Dataset):
    """Fixed-length chunks of the concatenated Alpaca-formatted, EOS-delimited documents of a JSONL file.

    Args:
        tokenizer: a Hugging Face tokenizer (its default special tokens are used, then EOS is appended).
        dataset_path: ``.jsonl`` or ``.jsonl.gz`` of ``{"prompt", "response"}`` rows.
        seq_length: ``m``, the length of every item.
        shuffle: shuffle documents (not tokens) before concatenation, with ``seed``.
        seed: shuffle seed. ``cache_dir``: token cache folder (``None``: default; ``False``: no cache).
        return_position_ids: items also carry ``position_ids`` restarting at 0 at each document start
            (padding-free packing with flash attention).
    """

    def __init__(self, tokenizer, dataset_path, seq_length: int, shuffle: bool, *, seed: int = 0,
                 cache_dir=None, return_position_ids: bool = False, template: str | None = None,
                 batch_size: int = 1000):
        if seq_length < 1:
            raise ValueError(f"PackedSFTDataset: seq_length must be >= 1, got {seq_length}")
        self.path = Path(dataset_path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"PackedSFTDataset: no such file {self.path}")
        self.seq_length, self.return_position_ids = seq_length, return_position_ids
        self.template = through_response(template if template is not None else bundled_prompt("alpaca_sft"))
        tokens, offsets = self._load_or_tokenize(tokenizer, cache_dir, batch_size)
        self.num_documents = len(offsets) - 1
        order = np.random.default_rng(seed).permutation(self.num_documents) if shuffle else None
        self.ids, self.document_boundaries = self._concatenate(tokens, offsets, order)
        logger.info("PackedSFTDataset %s: %d documents, %d tokens, %d items of %d tokens", self.path.name,
                    self.num_documents, len(self.ids), len(self), seq_length)

    # -- building ------------------------------------------------------------------------------------------
    def _cache_key(self, tokenizer) -> str:
        h = hashlib.sha256(CACHE_FORMAT.encode())
        for part in (_file_sha256(self.path), tokenizer_fingerprint(tokenizer), self.template):
            h.update(part.encode())
        return h.hexdigest()[:32]

    def _load_or_tokenize(self, tokenizer, cache_dir, batch_size) -> tuple[np.ndarray, np.ndarray]:
        self.cache_hit = False
        if cache_dir is False:
            return tokenize_documents(tokenizer, read_sft_texts(self.path, self.template), batch_size)
        folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "packed_sft"
        key = self._cache_key(tokenizer)
        tok_path, off_path = folder / f"{key}.tokens.npy", folder / f"{key}.offsets.npy"
        if tok_path.exists() and off_path.exists():
            logger.info("PackedSFTDataset: token cache hit %s", tok_path)
            self.cache_hit = True
            return np.load(tok_path, mmap_mode="r"), np.load(off_path)
        tokens, offsets = tokenize_documents(tokenizer, read_sft_texts(self.path, self.template), batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(tok_path, tokens)
        _save_atomic(off_path, offsets)
        logger.info("PackedSFTDataset: cached tokens of %s at %s", self.path.name, tok_path)
        return tokens, offsets

    @staticmethod
    def _concatenate(tokens, offsets, order) -> tuple[torch.Tensor, np.ndarray]:
        """Token stream in ``order`` (None: file order) and each document's start offset in it."""
        if order is None:
            stream, lengths = np.asarray(tokens, dtype=np.int64), np.diff(offsets)
        else:
            stream = np.concatenate([tokens[offsets[d] : offsets[d + 1]] for d in order]).astype(np.int64)
            lengths = np.diff(offsets)[order]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return torch.from_numpy(stream), starts

    # -- Dataset -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"PackedSFTDataset index {i} out of range for {n} items")
        m = self.seq_length
        item = {"input_ids": self.ids[i * m : (i + 1) * m], "labels": self.ids[i * m + 1 : (i + 1) * m + 1]}
        if self.return_position_ids:
            item["position_ids"] = self.position_ids(i)
        return item

    def position_ids(self, i: int) -> torch.Tensor:
        """``(m,)`` position of each input token within its document (0 at every document start)."""
        positions = np.arange(i * self.seq_length, (i + 1) * self.seq_length)
        doc = np.searchsorted(self.document_boundaries, positions, side="right") - 1
        return torch.from_numpy(positions - self.document_boundaries[doc])


def iterate_batches(dataset, batch_size: int, shuffle: bool, *, seed: int | None = None) -> DataLoader:
    """One epoch of ``{"input_ids", "labels"}`` batches ``(batch_size, m)`` (the last may be smaller).

    A ``DataLoader`` (so ``len()`` is the number of batches); ``shuffle`` reorders items, seeded by ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
