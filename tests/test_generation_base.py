"""alignkit.generation.base: SamplingParams checks, Completion.num_tokens, truncate_at_stop, the protocol."""
from __future__ import annotations

import random

import pytest

from alignkit.generation.base import Completion, Generator, SamplingParams, truncate_at_stop


# ------------------------------------------------------------------------------------------- SamplingParams
def test_defaults_are_greedy_with_independent_stop_lists():
    a, b = SamplingParams(), SamplingParams()
    got = (a.max_new_tokens, a.temperature, a.top_p, a.min_new_tokens, a.stop, a.seed)
    assert got == (256, 0.0, 1.0, 0, [], None)
    a.stop.append("x")
    assert b.stop == []  # no shared mutable default


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 1},
    {"temperature": 0.0}, {"temperature": 2.5},
    {"top_p": 1.0}, {"top_p": 1e-6},
    {"max_new_tokens": 4, "min_new_tokens": 4}, {"min_new_tokens": 0},
])
def test_boundary_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(params, key) == value


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": -3}, r"max_new_tokens must be >= 1, got -3"),
    ({"temperature": -0.1}, r"temperature must be >= 0, got -0.1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"max_new_tokens": 4, "min_new_tokens": 5}, r"min_new_tokens must be in \[0, max_new_tokens=4\], got 5"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be in \[0, max_new_tokens=256\], got -1"),
])
def test_invalid_values_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=r"SamplingParams\." + match):
        SamplingParams(**kwargs)


# ------------------------------------------------------------------------------------------------ Completion
@pytest.mark.parametrize("token_ids, usage_tokens, expected", [
    ([5, 6, 7], None, 3),
    ([5, 6, 7], 10, 3),  # the ids, when present, are the count
    ([], 4, 4),  # HTTP without ids: the server's usage
    ([], None, 0),
    ([], 0, 0),
])
def test_num_tokens(token_ids, usage_tokens, expected):
    assert Completion("t", token_ids=token_ids, usage_tokens=usage_tokens).num_tokens == expected


def test_completion_defaults():
    c = Completion("hi")
    assert (c.token_ids, c.finish_reason, c.prompt_tokens, c.usage_tokens) == ([], "stop", 0, None)


# ----------------------------------------------------------------------------------------- truncate_at_stop
@pytest.mark.parametrize("text, stop, expected", [
    ("answer: 4\n\nQ: next", ["\n\n"], ("answer: 4", True)),
    ("a STOP b END c", ["END", "STOP"], ("a ", True)),  # the earliest cut wins, not the first stop listed
    ("a STOP b END c", ["STOP", "END"], ("a ", True)),
    ("xab", ["ab", "b"], ("x", True)),  # overlapping stops: the one starting first
    ("xab", ["b", "ab"], ("x", True)),
    ("STOP at once", ["STOP"], ("", True)),
    ("no stop here", ["STOP"], ("no stop here", False)),
    ("text", [], ("text", False)),
    ("text", [""], ("text", False)),  # an empty stop string would cut everything: ignored
    ("te|xt", ["", "|"], ("te", True)),
    ("", ["x"], ("", False)),
])
def test_truncate_at_stop_cases(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


def _reference_truncate(text: str, stop: list[str]) -> tuple[str, bool]:
    """Scan left to right; cut at the first position where any non-empty stop string starts."""
    for i in range(len(text)):
        if any(s and text.startswith(s, i) for s in stop):
            return text[:i], True
    return text, False


def test_truncate_at_stop_matches_a_scanning_reference():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 12)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
                for _ in range(rng.randint(0, 3))]
        cut, stopped = truncate_at_stop(text, stop)
        assert (cut, stopped) == _reference_truncate(text, stop), (text, stop)
        assert all(not s or s not in cut for s in stop)  # the kept text holds no stop string


def test_truncate_at_stop_takes_a_tuple():
    assert truncate_at_stop("a.b", (".",)) == ("a", True)


# ------------------------------------------------------------------------------------------------ Generator
def test_generator_protocol_is_structural():
    class Full:
        name = "fake"

        def generate(self, prompts, params):
            return [Completion(p) for p in prompts]

        def chat(self, conversations, params):
            return [Completion("") for _ in conversations]

        def update_weights(self, model):
            return None

    class NoChat:
        name = "fake"

        def generate(self, prompts, params):
            return []

        def update_weights(self, model):
            return None

    assert isinstance(Full(), Generator)
    assert not isinstance(NoChat(), Generator)
