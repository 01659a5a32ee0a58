"""The generation interface shared by eval, judges and RL rollouts.

Contract (every backend keeps it, tests in tests/test_generation_*.py check it):

* ``generate(prompts, params)`` takes raw prompt strings (already formatted: no chat template is
  applied) and returns exactly one :class:`Completion` per prompt, in order. For several samples
  per prompt (GRPO groups), repeat the prompt; ``params.seed`` makes sampling reproducible.
* ``chat(conversations, params)`` takes OpenAI-style message lists and applies the model's chat
  template (HF/vLLM) or calls ``/v1/chat/completions`` (HTTP). One Completion per conversation.
* ``text`` never contains the stop string that ended it (as vLLM and the OpenAI API do);
  ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"``.
* A backend MAY accept a keyword ``on_result`` (an :data:`OnResult`) in ``generate``/``chat``: it is
  then called in the calling thread with ``(index, Completion)`` as soon as each request finishes, or
  ``(index, exception)`` for a request that failed for good (that example only; the call goes on and
  returns None at that index). The HTTP backend does; eval's runner uses it to save each example
  at once (:func:`accepts_on_result` tells whether a method takes it).
* ``update_weights(model)`` makes later generations use the weights of ``model`` (a no-op where
  the backend shares the module, a state-dict load for vLLM, unsupported over HTTP).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class SamplingParams:
    """Decoding settings. Greedy when ``temperature == 0`` (the eval default of the reference)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"SamplingParams.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]


@dataclass
class Completion:
    """One generated continuation of one prompt."""

    text: str
    token_ids: list[int] = field(default_factory=list)  # generated tokens only, stop string cut
    finish_reason: str = "stop"  # "stop" | "length"
    prompt_tokens: int = 0
    usage_tokens: int | None = None  # generated-token count reported by a server when ids are not returned

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids else (self.usage_tokens or 0)


@runtime_checkable
class Generator(Protocol):
    """What every backend implements. ``name`` is recorded in results (e.g. ``hf:/path/to/model``)."""

    name: str

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]: ...

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams) -> list[Completion]: ...

    def update_weights(self, model) -> None: ...


OnResult = Callable[[int, "Completion | Exception"], None]


def accepts_on_result(method) -> bool:
    """True when a ``generate``/``chat`` method takes the optional ``on_result`` keyword."""
    try:
        return "on_result" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest occurrence of any stop string; return (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
