"""Throughput counters every backend keeps on ``generator.stats`` (eval reports read them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    """Cumulative counters since construction (or :meth:`reset`)."""

    requests: int = 0  # completions returned
    prompt_tokens: int = 0
    generated_tokens: int = 0  # HTTP: the server's usage.completion_tokens
    seconds: float = 0.0  # wall time spent inside generate/chat

    def add(self, *, requests: int, prompt_tokens: int, generated_tokens: int, seconds: float) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        self.requests = self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}
