"""Generation with transformers' ``model.generate``: batched, left-padded, KV-cached.

The backend for CPU runs, tests, and RL rollouts that share the policy module (``update_weights``
is then a no-op). Decoding is plain: greedy at ``temperature == 0``, else temperature + top-p
sampling; the model's own ``generation_config`` sampling defaults (top-k, repetition penalty) are
switched off so that the same :class:`SamplingParams` mean the same thing on every backend.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from alignkit.generation.base import Completion, SamplingParams, truncate_at_stop
from alignkit.generation.stats import GenerationStats

logger = logging.getLogger(__name__)


class HFGenerator:
    """A :class:`~alignkit.generation.base.Generator` around a transformers causal LM.

    Args:
        model: a ``PreTrainedModel`` (or PEFT model) with ``.generate``; it is used in place.
        tokenizer: its tokenizer; never mutated (padding is done here, on the left).
        batch_size: prompts per ``generate`` call (prompts are sorted by length first).
        name: recorded in results; default ``hf:<model.name_or_path>``.
        log_batches: log one INFO line per batch (default: DEBUG only).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str | None = None,
                 log_batches: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"HFGenerator batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.log_batches = log_batches
        self.name = name or f"hf:{getattr(model, 'name_or_path', '') or type(model).__name__}"
        self.stats = GenerationStats()
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """Raw prompt strings (no chat template); the tokenizer's special tokens (e.g. BOS) are added."""
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in _as_list(prompts)]
        return self._generate_ids(encoded, params)

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams) -> list[Completion]:
        """Message lists, formatted with the tokenizer's chat template and a generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"HFGenerator.chat: tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r} has no "
                "chat_template; use generate() with formatted prompts or set tokenizer.chat_template"
            )
        encoded = []
        for conv in _as_list(conversations):
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            # The template already wrote the special tokens it wants.
            encoded.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._generate_ids(encoded, params)

    def update_weights(self, model) -> None:
        """No-op when ``model`` is (or wraps, e.g. PEFT) the module we generate with; else copy its weights."""
        if _same_module(model, self.model):
            return
        try:
            self.model.load_state_dict(model.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"HFGenerator.update_weights: state dict of {type(model).__name__} does not "
                             f"match the generator's {type(self.model).__name__}: {err}") from err

    # ------------------------------------------------------------------ internals
    def _generate_ids(self, encoded: list[list[int]], params: SamplingParams) -> list[Completion]:
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"HFGenerator: prompt {i} is empty after tokenization")
        started = time.perf_counter()
        # Longest first: similar lengths share a batch (less padding); results go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        n_batches = (len(order) + self.batch_size - 1) // self.batch_size
        with self._generation_mode(), _seeded(params.seed, _device(self.model)):
            for b in range(n_batches):
                # 1. Take the next batch of indices (in length order) and generate for it.
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                t0 = time.perf_counter()
                completions = self._generate_batch([encoded[i] for i in idx], params)
                # 2. Put each completion back at its prompt's position.
                for i, completion in zip(idx, completions):
                    results[i] = completion
                # 3. Report progress.
                n_tok = sum(c.num_tokens for c in completions)
                logger.log(logging.INFO if self.log_batches else logging.DEBUG,
                           "hf generate: batch %d/%d, %d prompts, %d new tokens, %.2fs",
                           b + 1, n_batches, len(idx), n_tok, time.perf_counter() - t0)
        self.stats.add(requests=len(encoded), prompt_tokens=sum(len(e) for e in encoded),
                       generated_tokens=sum(c.num_tokens for c in results),
                       seconds=time.perf_counter() - started)
        return results

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = _device(self.model)
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        extra = {"stopping_criteria": StoppingCriteriaList([self._stop_criteria(params.stop)])} if params.stop else {}
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  generation_config=self._generation_config(params), **extra)  # (B, T + N)
        new_tokens = out[:, width:].tolist()  # (B, N), rows padded after they finished
        return [self._to_completion(row, params, len(ids)) for row, ids in zip(new_tokens, batch)]

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # top_k=0 overrides a model default (e.g. 50): plain temperature/top-p sampling, as vLLM does.
        sampling = ({"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
                    if params.temperature > 0 else {"do_sample": False})
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id, use_cache=True, num_beams=1,
            repetition_penalty=1.0,  # override a model default: the same params mean the same on every backend
            **sampling,
        )

    def _stop_criteria(self, stop: list[str]) -> StopStringCriteria:
        """Stop-string criteria, built once per stop list: building one scans the whole vocabulary (~2 s)."""
        key = tuple(stop)
        cache = self.__dict__.setdefault("_stop_cache", {})
        if key not in cache:
            cache[key] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        return cache[key]

    def _to_completion(self, row: list[int], params: SamplingParams, prompt_tokens: int) -> Completion:
        # 1. Cut at the first EOS. Works when eos == pad (SmolLM2): the padding after a finished
        #    row starts after its EOS, so it is cut with it.
        eos_at = next((k for k, tok in enumerate(row) if tok in self.eos_token_ids), None)
        ids = row[:eos_at] if eos_at is not None else list(row)
        # 2. Rows stopped by a stop string are padded with pad_token_id (only distinct from EOS here).
        if eos_at is None and self.pad_token_id not in self.eos_token_ids:
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
        # 3. Cut the text at the stop string, and the tokens to those wholly before it.
        text, hit_stop = truncate_at_stop(self._decode(ids), params.stop)
        if hit_stop:
            ids = tokens_within(ids, text, self._decode)
        stopped = eos_at is not None or hit_stop or len(ids) < params.max_new_tokens
        return Completion(text=text, token_ids=ids, finish_reason="stop" if stopped else "length",
                          prompt_tokens=prompt_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @contextlib.contextmanager
    def _generation_mode(self):
        """Eval mode and no autograd for the call; the caller's train/eval state is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)


def tokens_within(ids: list[int], text: str, decode) -> list[int]:
    """Longest prefix of ``ids`` whose decoding is a prefix of ``text`` (a stop string cut sits near the
    end, so few decodes are needed)."""
    for j in range(len(ids), -1, -1):
        if text.startswith(decode(ids[:j])):
            return ids[:j]
    return []


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("HFGenerator: neither model.generation_config nor the tokenizer defines an EOS token")
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _same_module(a, b) -> bool:
    """True when a and b are the same module or one is a PEFT wrapper whose base model is the other."""
    def base(m):
        get = getattr(m, "get_base_model", None)
        return get() if callable(get) else m
    return a is b or base(a) is b or base(b) is a or base(a) is base(b)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the call without changing the caller's global RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _as_list(items) -> list:
    if isinstance(items, str):
        raise TypeError("expected a sequence of prompts/conversations, got a single str")
    return list(items)
