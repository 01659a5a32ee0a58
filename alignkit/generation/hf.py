"""Generation with a transformers causal LM: continuous batching over a KV cache, or ``model.generate``.

The backend for CPU runs, tests, and RL rollouts that share the policy module (``update_weights``
is then a no-op). Decoding is plain: greedy at ``temperature == 0``, else temperature + top-p
sampling; the model's own ``generation_config`` sampling defaults (top-k, repetition penalty) are
switched off so that the same :class:`SamplingParams` mean the same thing on every backend.

Two paths (``HFGenerator(continuous=...)``):

* continuous (default): alignkit's own decode loop (:class:`ContinuousBatch`) keeps
  ``batch_size`` rows running; a row that ends (EOS, a stop string in its text, ``max_new_tokens``)
  leaves the batch and the KV cache at once and the next prompt (longest first) takes its slot. The
  prompts' shared token prefix (a system prompt, a chat template's header) is prefilled once.
* static: ``model.generate`` on length-sorted, left-padded batches (``StopStringCriteria`` for stops).

Greedy texts are the same on both paths (and one prompt at a time) up to float rounding of
different batch shapes. Seeded sampling is reproducible for the same prompts, ``batch_size`` and
path; the two paths draw different samples.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    StoppingCriteriaList,
    StopStringCriteria,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from alignkit.generation.base import Completion, SamplingParams, truncate_at_stop
from alignkit.generation.stats import GenerationStats

logger = logging.getLogger(__name__)


class HFGenerator:
    """A :class:`~alignkit.generation.base.Generator` around a transformers causal LM.

    Args:
        model: a ``PreTrainedModel`` (or PEFT model) with ``.generate``; it is used in place.
        tokenizer: its tokenizer; never mutated (padding is done here, on the left).
        batch_size: rows decoded at once (continuous: slots refilled as rows end; static: prompts per
            ``generate`` call). Prompts are taken longest first; results come back in input order.
        name: recorded in results; default ``hf:<model.name_or_path>``.
        log_batches: log one INFO line per batch (default: DEBUG only).
        continuous: the continuous-batching decode loop (default); False: static ``model.generate``
            batches. Models whose cache is not plain full attention (sliding windows) use the static path.
        share_prefix: (continuous) prefill the prompts' common token prefix once and reuse its KV cache.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str | None = None,
                 log_batches: bool = False, continuous: bool = True, share_prefix: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"HFGenerator batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.log_batches = log_batches
        self.continuous = continuous
        self.share_prefix = share_prefix
        self.name = name or f"hf:{getattr(model, 'name_or_path', '') or type(model).__name__}"
        self.stats = GenerationStats()
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str], params: SamplingParams, on_result=None) -> list[Completion]:
        """Raw prompt strings (no chat template); the tokenizer's special tokens (e.g. BOS) are added.
        ``on_result(i, completion)``: called for prompt ``i`` as soon as its completion is finished (the
        continuous path: when its row ends; the static path: when its batch ends)."""
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in _as_list(prompts)]
        return self._generate_ids(encoded, params, on_result)

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams, on_result=None) -> list[Completion]:
        """Message lists, formatted with the tokenizer's chat template and a generation prompt
        (``on_result``: as in :meth:`generate`)."""
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
        return self._generate_ids(encoded, params, on_result)

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
    def _generate_ids(self, encoded: list[list[int]], params: SamplingParams, on_result=None) -> list[Completion]:
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"HFGenerator: prompt {i} is empty after tokenization")
        started = time.perf_counter()
        with self._generation_mode(), _seeded(params.seed, _device(self.model)):
            if self.continuous and _plain_cache(self.model):
                results = ContinuousBatch(self, params, on_result).run(encoded)
            else:
                results = self._generate_static(encoded, params, on_result)
        self.stats.add(requests=len(encoded), prompt_tokens=sum(len(e) for e in encoded),
                       generated_tokens=sum(c.num_tokens for c in results),
                       seconds=time.perf_counter() - started)
        return results

    def _generate_static(self, encoded: list[list[int]], params: SamplingParams, on_result=None
                         ) -> list[Completion]:
        """``model.generate`` on batches of ``batch_size`` prompts, longest first; results in input order."""
        # Longest first: similar lengths share a batch (less padding); results go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        n_batches = (len(order) + self.batch_size - 1) // self.batch_size
        for b in range(n_batches):
            # 1. Take the next batch of indices (in length order) and generate for it.
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            t0 = time.perf_counter()
            completions = self._generate_batch([encoded[i] for i in idx], params)
            # 2. Put each completion back at its prompt's position.
            for i, completion in zip(idx, completions):
                results[i] = completion
                if on_result is not None:
                    on_result(i, completion)
            # 3. Report progress.
            n_tok = sum(c.num_tokens for c in completions)
            logger.log(logging.INFO if self.log_batches else logging.DEBUG,
                       "hf generate: batch %d/%d, %d prompts, %d new tokens, %.2fs",
                       b + 1, n_batches, len(idx), n_tok, time.perf_counter() - t0)
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

    def _finished(self, tokens: list[int], params: SamplingParams, prompt_tokens: int, eos: bool) -> Completion:
        """The Completion of a row the decode loop ended (``tokens`` without the EOS that ended it, if any)."""
        text, hit_stop = truncate_at_stop(self._decode(tokens), params.stop)
        ids = tokens_within(tokens, text, self._decode) if hit_stop else list(tokens)
        return Completion(text=text, token_ids=ids, finish_reason="stop" if eos or hit_stop else "length",
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


@dataclass
class _Row:
    """One prompt in flight in :class:`ContinuousBatch`."""

    index: int  # position in the caller's list
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated so far


class ContinuousBatch:
    """Continuous batching over one ``DynamicCache``: up to ``gen.batch_size`` rows decode together.

    The rows sit left-padded to a common cache width (``mask`` (B, W): 1 = a real token). Each step
    feeds every row its last token (positions from the mask, as ``model.generate`` computes them);
    a row that ends leaves the batch and the cache at once (``index_select`` on every layer, then the
    columns no row uses any more are cut), and the next prompt in the queue (longest first) is
    prefilled and joins. The common token prefix of all prompts is prefilled once
    (``share_prefix``): each row's cache then holds [prefix][padding][rest of its prompt][generated].
    A row ends at EOS, at ``max_new_tokens``, or when a stop string appears in its decoded text.
    The cache layers (:class:`_AppendLayer`) append each step's keys/values in place.
    """

    def __init__(self, gen: HFGenerator, params: SamplingParams, on_result=None) -> None:
        self.gen, self.params, self.model, self.on_result = gen, params, gen.model, on_result
        self.device = _device(gen.model)
        self.eos = set(gen.eos_token_ids)
        params_of_forward = _forward_parameters(gen.model)
        self.keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in params_of_forward else {}
        self.cache_kw = "cache" if "cache" in params_of_forward else "past_key_values"  # renamed in transformers 5
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, W)
        self.last = torch.zeros((0,), dtype=torch.long, device=self.device)  # (B,) next input token per row

    def run(self, encoded: list[list[int]]) -> list[Completion]:
        """One Completion per prompt, in input order."""
        self.results: list[Completion | None] = [None] * len(encoded)
        self.prefix_len, self.prefix_kv = self._prefix(encoded)
        queue = deque(sorted(range(len(encoded)), key=lambda i: -len(encoded[i])))
        steps = 0
        while queue or self.rows:
            free = self.gen.batch_size - len(self.rows)
            if queue and free > 0:
                new = [queue.popleft() for _ in range(min(free, len(queue)))]
                self._admit(new, encoded)
                continue
            self._step()
            steps += 1
        logger.log(logging.INFO if self.gen.log_batches else logging.DEBUG,
                   "hf continuous batching: %d prompts, %d decode steps, shared prefix %d tokens",
                   len(encoded), steps, self.prefix_len)
        return self.results

    # -------------------------------------------------------------- prefill
    def _prefix(self, encoded: list[list[int]]) -> tuple[int, list]:
        """(length, per-layer (keys, values) of shape (1, H, P, D)) of the prompts' common prefix,
        leaving at least one token of every prompt to prefill with the rest of its row."""
        if not self.gen.share_prefix or len(encoded) < 2:
            return 0, []
        first, n = encoded[0], min(len(e) for e in encoded) - 1
        p = next((k for k in range(n) if any(e[k] != first[k] for e in encoded)), n)
        if p == 0:
            return 0, []
        cache = _new_cache(self.model.config)
        ids = torch.tensor([first[:p]], device=self.device)  # (1, P)
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(p, device=self.device)[None],
                   **{self.cache_kw: cache}, use_cache=True, **self.keep_logits)
        return p, [(layer.keys, layer.values) for layer in cache.layers]

    def _admit(self, new: list[int], encoded: list[list[int]]) -> None:
        """Prefill the prompts ``new`` (left-padded among themselves, after the shared prefix), pick their
        first tokens, and merge the rows still running into the batch."""
        p, k = self.prefix_len, len(new)
        rest = [encoded[i][p:] for i in new]
        width = max(len(r) for r in rest)
        ids = torch.full((k, width), self.gen.pad_token_id, dtype=torch.long)  # (k, S)
        mask = torch.zeros((k, p + width), dtype=torch.long)  # (k, P + S)
        mask[:, :p] = 1
        for row, r in enumerate(rest):
            ids[row, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[row, p + width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = _new_cache(self.model.config)
        for layer, (keys, values) in zip(cache.layers, self.prefix_kv):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys.expand(k, -1, -1, -1), values.expand(k, -1, -1, -1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, p:]  # (k, S), as model.generate
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self.cache_kw: cache},
                         use_cache=True, **self.keep_logits)
        rows = [_Row(i, len(encoded[i])) for i in new]
        keep, chosen = self._advance(rows, out.logits[:, -1])
        self._merge([rows[r] for r in keep], cache, mask, keep, chosen)

    # -------------------------------------------------------------- decode
    def _step(self) -> None:
        """One token for every running row; rows that end leave the batch."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (B, W + 1)
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): real tokens before this one
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=positions,
                         **{self.cache_kw: self.cache}, use_cache=True, **self.keep_logits)
        self.mask = mask
        keep, chosen = self._advance(self.rows, out.logits[:, -1])
        if len(keep) < len(self.rows):
            self._select(keep)
        self.last = torch.tensor(chosen, dtype=torch.long, device=self.device)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Pick each row's next token from ``logits`` (R, V); finish the rows that end.
        Returns (indices of the rows still running, their chosen tokens)."""
        params, gen = self.params, self.gen
        picked = _pick(logits.float(), rows, params, gen.eos_token_ids)
        keep, chosen = [], []
        for r, (row, tok) in enumerate(zip(rows, picked)):
            eos = tok in self.eos
            if not eos:
                row.tokens.append(tok)
            done = (eos or len(row.tokens) >= params.max_new_tokens
                    or (params.stop and truncate_at_stop(gen._decode(row.tokens), params.stop)[1]))
            if done:
                self.results[row.index] = gen._finished(row.tokens, params, row.prompt_tokens, eos)
                if self.on_result is not None:
                    self.on_result(row.index, self.results[row.index])
            else:
                keep.append(r)
                chosen.append(tok)
        return keep, chosen

    # -------------------------------------------------------------- the batch's cache
    def _select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` only; cut the leading cache columns that are padding in every row left."""
        self.rows = [self.rows[r] for r in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(0).nonzero()[0]) if keep else self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = self.mask[:, first:]

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, keep: list[int], chosen: list[int]) -> None:
        """Add the kept rows of a freshly prefilled ``cache``/``mask`` to the batch (left-padding the
        narrower of the two to the other's width)."""
        if not rows:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = mask.index_select(0, index)
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = cache, mask, rows
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            self.last = torch.tensor(chosen, dtype=torch.long, device=self.device)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys.index_select(0, index), width)])
            mine.values = torch.cat([_pad_left(mine.values, width),
                                     _pad_left(theirs.values.index_select(0, index), width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows = self.rows + rows
        self.last = torch.cat([self.last, torch.tensor(chosen, dtype=torch.long, device=self.device)])


class _AppendLayer(DynamicLayer):
    """A :class:`DynamicLayer` that appends into spare room (``_ROOM`` more positions at a time) instead of
    copying the whole cache with ``torch.cat`` at every step; ``keys``/``values`` are views of the filled part.
    A cache tensor assigned from outside (row selection, merges, the shared prefix) is copied in once."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        n, buf = key_states.shape[-2], getattr(self, "_buf", None)
        if (buf is None or buf[0].data_ptr() != self.keys.data_ptr() or t + n > buf[0].shape[-2]
                or buf[0].shape[:2] != key_states.shape[:2]):
            b, h, _, d = key_states.shape
            buf = (key_states.new_empty((b, h, t + n + _ROOM, d)), value_states.new_empty((b, h, t + n + _ROOM, d)))
            if t:
                buf[0][:, :, :t], buf[1][:, :, :t] = self.keys, self.values
            self._buf = buf
        buf[0][:, :, t:t + n], buf[1][:, :, t:t + n] = key_states, value_states
        self.keys, self.values = buf[0][:, :, :t + n], buf[1][:, :, :t + n]
        return self.keys, self.values


_ROOM = 128  # cache positions added at a time by _AppendLayer


def _new_cache(config) -> DynamicCache:
    """A DynamicCache of :class:`_AppendLayer` s (the model's layers are all plain: :func:`_plain_cache`)."""
    cache = DynamicCache(config=config)
    cache.layers = [_AppendLayer() for _ in cache.layers]
    return cache


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis up to ``width``: dim -2 of (B, H, T, D) caches, dim -1 of (B, T) masks."""
    pad = width - (t.shape[-1] if t.dim() == 2 else t.shape[-2])
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (pad, 0) if t.dim() == 2 else (0, 0, pad, 0))


def _pick(logits: torch.Tensor, rows: list[_Row], params: SamplingParams, eos_ids: list[int]) -> list[int]:
    """Next tokens from (R, V) float32 logits, with ``model.generate``'s processors: EOS masked before
    ``min_new_tokens``; greedy argmax, or temperature then top-p then a multinomial draw."""
    if params.min_new_tokens:
        short = [r for r, row in enumerate(rows) if len(row.tokens) < params.min_new_tokens]
        if short:
            logits[torch.tensor(short)[:, None], torch.tensor(eos_ids)[None]] = -math.inf
    if params.temperature == 0:
        return logits.argmax(-1).tolist()
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0].tolist()


def _plain_cache(model) -> bool:
    """True when every layer of the model's DynamicCache is a plain growing one (no sliding window)."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - an unusual config: the static path handles it
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _forward_parameters(model) -> set[str]:
    """The keyword names of the (base, under PEFT) model's ``forward``."""
    get = getattr(model, "get_base_model", None)
    base = get() if callable(get) else model
    return set(inspect.signature(base.forward).parameters)


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
