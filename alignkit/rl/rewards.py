"""Verifiable rewards for GRPO: GSM8K final number, DeepSeek-R1-Zero format + math equivalence.

Every reward function has the signature ``reward_fn(response: str, ground_truth: str) -> dict`` and
returns ``{"reward", "format_reward", "answer_reward"}`` (floats in [0, 1]); this is the signature
``alignkit.rl.core.compute_group_normalized_rewards`` calls (CS336 A5 convention).

r1-zero format (prompt ``resources/prompts/r1_zero.prompt``, which ends with ``Assistant: <think>``):
the *completion* starts inside the think block, so a well-formed completion is exactly::

    <reasoning, no tags> </think> <answer> <final answer, no tags> </answer>

i.e. the regex ``^(?:(?!<think>|</think>|<answer>|</answer>).)*</think>\\s*<answer>(.*)</answer>\\s*$``
(DOTALL, the reasoning and the answer may not contain any of the four tags; whitespace between
``</think>`` and ``<answer>`` and after ``</answer>`` is allowed; nothing else may follow
``</answer>``). Generation stops at ``</answer>`` and backends cut the stop string, so the GRPO loop
re-appends it before scoring (``RewardPreset.append_stop``). Following CS336 / DeepSeek-R1-Zero,
``reward = answer_reward`` when the completion is well formed and ``0`` otherwise: an unformatted
correct number earns nothing (``answer_reward`` is then reported as 0 too).

Answer correctness is the GSM8K task's one grader (:meth:`alignkit.eval.tasks.gsm8k.GSM8K.grade`, i.e.
:func:`alignkit.eval.tasks.graders.answers_equivalent`: ``0.5 == 1/2 == \\frac{1}{2}``, ``\\boxed{7} == 7``,
``1,000 == 1000`` with ``math_verify`` after a fast exact/numeric check), so an eval score and an RL
reward never disagree on an answer; the ``gsm8k`` preset *is* the task's :meth:`~alignkit.eval.tasks.base.Task.reward`.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignkit.eval.tasks.graders import answers_equivalent
from alignkit.eval.tasks.gsm8k import GSM8K, gold_answer

__all__ = ["REWARDS", "RewardFn", "RewardModelScorer", "RewardPreset", "answers_equivalent", "get_reward",
           "gold_answer", "gsm8k_reward", "load_reward_fn", "r1_zero_reward"]

RewardFn = Callable[[str, str], dict]

_TAGS = r"<think>|</think>|<answer>|</answer>"
_R1_ZERO_RE = re.compile(rf"^(?:(?!{_TAGS}).)*</think>\s*<answer>((?:(?!{_TAGS}).)*)</answer>\s*$", re.DOTALL)
_GSM8K = GSM8K()  # the task object whose reward() the gsm8k preset is (no data is read)


def _result(format_reward: float, answer_reward: float, reward: float) -> dict:
    return {"reward": float(reward), "format_reward": float(format_reward), "answer_reward": float(answer_reward)}


def r1_zero_reward(response: str, ground_truth: str) -> dict:
    """DeepSeek-R1-Zero reward (Guo et al., 2025; CS336 A5 ``r1_zero_reward_fn``): format then answer.

    ``response`` is the completion after ``Assistant: <think>`` with ``</answer>`` re-appended.
    """
    match = _R1_ZERO_RE.match(response)
    if match is None:
        return _result(0.0, 0.0, 0.0)
    correct = GSM8K.grade(match.group(1), gold_answer(ground_truth))
    return _result(1.0, float(correct), float(correct))


def gsm8k_reward(response: str, ground_truth: str) -> dict:
    """GSM8K (Cobbe et al., 2021) reward: the GSM8K task's own :meth:`~alignkit.eval.tasks.base.Task.reward`
    (its parser, the last number of the response, and its grader against the gold answer).

    ``format_reward`` is 1 when a number can be parsed (``alignkit.eval.parsers.parse_gsm8k_response``).
    """
    return _GSM8K.reward(GSM8K.example_for(ground_truth), response)


@dataclass(frozen=True)
class RewardPreset:
    """A reward with the prompt and stop strings it expects."""

    fn: RewardFn
    prompt: str  # name of a bundled prompt (alignkit.resources.prompt), with a {question} field
    stop: list[str] = field(default_factory=list)
    append_stop: bool = False  # re-append the stop string to the completion before scoring


REWARDS: dict[str, RewardPreset] = {
    "gsm8k": RewardPreset(gsm8k_reward, prompt="question_only"),
    "r1_zero": RewardPreset(r1_zero_reward, prompt="r1_zero", stop=["</answer>"], append_stop=True),
}


def load_reward_fn(spec: str) -> RewardFn:
    """Import a reward function from ``"package.module:function"``; errors say which part failed."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(
            f"reward {spec!r}: expected a registered name ({', '.join(REWARDS)}) or 'module.path:function'"
        )
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(
            f"reward {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
            f"{attr!r}; callables there: {', '.join(public) or 'none'}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward {spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def get_reward(spec: str | RewardFn) -> RewardPreset:
    """A preset by registry name, or an imported ``module:function`` (question-only prompt, no stop)."""
    if callable(spec):
        return RewardPreset(spec, prompt="question_only")
    if spec in REWARDS:
        return REWARDS[spec]
    return RewardPreset(load_reward_fn(spec), prompt="question_only")


class RewardModelScorer:
    """A learned reward: a sequence-classification model with one label (e.g. the ``reward`` stage's output,
    trained by TRL's RewardTrainer) scoring ``prompt + response`` as it was trained: EOS appended when the
    text does not end with it, right-padded, the model's own pooled logit. ``score_batch(prompts, responses,
    ground_truths) -> [{"reward": r}]`` is what the RL loop calls (ground truths are not read)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:  # HF pools at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id

    def __call__(self, response: str, ground_truth: str) -> dict:
        raise TypeError("RewardModelScorer scores a prompt with its response: call score_batch(prompts, responses)")

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    ground_truths: Sequence[str] | None = None) -> list[dict]:
        eos = self.tokenizer.eos_token or ""
        texts = [p + r if r.endswith(eos) else p + r + eos for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        out: list[dict] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, return_tensors="pt",
                                     truncation=self.max_length is not None, max_length=self.max_length)
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits  # (b, 1)
                out += [{"reward": float(x)} for x in logits[:, 0].float().tolist()]
        finally:
            self.tokenizer.padding_side = side
        return out
