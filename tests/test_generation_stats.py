"""alignkit.generation.stats.GenerationStats: accumulation, throughput, reset, the dict eval reports read."""
from __future__ import annotations

import json

import pytest

from alignkit.generation.stats import GenerationStats


def test_starts_at_zero_with_zero_throughput():
    s = GenerationStats()
    assert (s.requests, s.prompt_tokens, s.generated_tokens, s.seconds) == (0, 0, 0, 0.0)
    assert s.tokens_per_second == 0.0  # no division by zero before any call


def test_add_accumulates_and_throughput_is_total_tokens_over_total_time():
    s = GenerationStats()
    s.add(requests=2, prompt_tokens=10, generated_tokens=30, seconds=1.5)
    s.add(requests=1, prompt_tokens=5, generated_tokens=6, seconds=0.5)
    assert (s.requests, s.prompt_tokens, s.generated_tokens) == (3, 15, 36)
    assert s.seconds == pytest.approx(2.0)
    assert s.tokens_per_second == pytest.approx(36 / 2.0)  # 18, not the mean of 20 and 12


def test_tokens_without_time_report_zero_throughput():
    s = GenerationStats()
    s.add(requests=1, prompt_tokens=1, generated_tokens=5, seconds=0.0)
    assert s.tokens_per_second == 0.0


def test_add_takes_keywords_only():
    with pytest.raises(TypeError):
        GenerationStats().add(1, 2, 3, 0.1)


def test_reset_zeroes_every_counter():
    s = GenerationStats(requests=4, prompt_tokens=8, generated_tokens=16, seconds=2.0)
    s.reset()
    assert s == GenerationStats()
    assert s.tokens_per_second == 0.0
    s.add(requests=1, prompt_tokens=2, generated_tokens=4, seconds=0.25)
    assert s.tokens_per_second == pytest.approx(16.0)


def test_to_dict_holds_the_counters_and_throughput_as_plain_json():
    s = GenerationStats()
    s.add(requests=5, prompt_tokens=50, generated_tokens=100, seconds=4.0)
    d = s.to_dict()
    assert d == {"requests": 5, "prompt_tokens": 50, "generated_tokens": 100, "seconds": 4.0,
                 "tokens_per_second": 25.0}
    assert json.loads(json.dumps(d)) == d
    s.reset()
    assert d["requests"] == 5  # a snapshot, not a view
