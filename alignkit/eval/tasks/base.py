"""The evaluation ``Task``: data, prompt, sampling params, parser, grader, aggregate and RL reward.

One object per benchmark (nanochat ``tasks/`` and lm-eval style). What is declarative about a task
(data file, prompt template, stop strings, token cap, parser, grader, metric) is its
:class:`~alignkit.eval.tasks.spec.TaskSpec` (``Task.spec``), the one definition that the lm-eval
YAMLs are also generated from (:func:`alignkit.eval.harness.task_dir`). The runner asks a task for
its examples, formats each into a prompt in one of three styles, generates with a
:class:`~alignkit.generation.base.Generator`, scores each completion, and aggregates the records.
The GRPO rewards (:mod:`alignkit.rl.rewards`) call :meth:`Task.reward` / :meth:`Task.grade`.

Prompt styles (CS336 A5 supplement, sections 2 and 4):

* ``zero_shot``: the shared system prompt (``zero_shot_system_prompt.prompt``) wraps the task
  prompt through ``{instruction}``; generation stops at ``"# Query:"``.
* ``alpaca``: the Alpaca SFT template with an empty ``{response}``, for instruction-tuned models.
* ``chat``: one user message; the generator's ``chat()`` applies the model's chat template.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

from alignkit import resources
from alignkit.data.io import location, read_rows
from alignkit.eval.judge import keyword_refusal, require_some_valid
from alignkit.eval.metrics import pass_at_k_mean
from alignkit.eval.tasks.spec import METRICS, TaskSpec
from alignkit.generation.base import SamplingParams

STYLES = ("zero_shot", "alpaca", "chat")
STOP_BY_STYLE = {"zero_shot": ["# Query:"], "alpaca": ["### Instruction:"], "chat": []}


def wrap_prompt(instruction: str, style: str) -> str | list[dict]:
    """Wrap a task prompt in the style's template (a message list for ``chat``)."""
    if style == "zero_shot":
        return resources.prompt("zero_shot_system_prompt").replace("{instruction}", instruction)
    if style == "alpaca":
        # everything before {response}: the template's trailing newline would follow an empty response
        template = resources.prompt("alpaca_sft").split("{response}")[0]
        return template.replace("{instruction}", instruction)
    if style == "chat":
        return [{"role": "user", "content": instruction}]
    raise ValueError(f"unknown prompt style {style!r}; valid styles: {', '.join(STYLES)}")


def clean_output(text: str, style: str) -> str:
    """The answer part of a generation: whitespace stripped, and for ``zero_shot`` the closing
    code fence of the system prompt's ``# Answer:`` block removed."""
    text = text.strip()
    if style == "zero_shot" and text.endswith("```"):
        text = text[: -len("```")].rstrip()
    return text


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file (read by :func:`alignkit.data.io.read_rows`, the package's one reader); a bad
    line or a missing field is an error naming file, line and field."""
    rows = []
    for row in read_rows(path):
        for key in required:
            if not isinstance(row.data.get(key), str) or not row.data[key].strip():
                raise ValueError(f"{location(row.source, row.line)}: field {key!r} is missing or not a "
                                 "non-empty string")
        rows.append(row.data)
    return rows


def pass_at_k_ks(n: int) -> list[int]:
    """The k of pass@k reported for ``n`` samples: the powers of two up to ``n``, and ``n``."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def pass_at_k_summary(records: list[dict]) -> dict:
    """``{"samples": N, "pass@1": .., "pass@2": .., ..., "pass@N": ..}`` from records carrying a
    ``samples`` list (``--samples N``): :func:`~alignkit.eval.metrics.pass_at_k_mean` of (n = samples,
    c = correct samples) per example. ``{}`` when no record has samples."""
    per_problem = [(len(r["samples"]), sum(bool(s["correct"]) for s in r["samples"]))
                   for r in records if r.get("samples")]
    if not per_problem:
        return {}
    n = min(p[0] for p in per_problem)
    return {"samples": n, **{f"pass@{k}": pass_at_k_mean(per_problem, k) for k in pass_at_k_ks(n)}}


def accuracy_summary(records: list[dict]) -> dict:
    """Accuracy = correct / all (unparseable counts as wrong), with the unparseable count and examples.
    With ``--samples N`` (records with a ``samples`` list) the record's own score is its first sample's,
    and pass@k (:func:`pass_at_k_summary`) is added."""
    n = len(records)
    correct = sum(bool(r["score"]["correct"]) for r in records)
    unparseable = [r for r in records if r["score"]["parsed"] is None]
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "unparseable": len(unparseable),
        "unparseable_examples": [{"id": r["id"], "generation": r["generation"]} for r in unparseable[:5]],
        **pass_at_k_summary(records),
    }


def first_n(examples: list[dict], limit: int | None) -> list[dict]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return examples if limit is None else examples[:limit]


def seeded_subset(examples: list[dict], limit: int | None, seed: int) -> list[dict]:
    """``limit`` examples drawn with ``random.Random(seed)``, kept in their original order."""
    if limit is None or limit >= len(examples):
        return first_n(examples, limit)
    first_n(examples, limit)  # validates limit >= 0
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def first_n_per_subject(examples: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` examples of each ``subject`` in their order (``None``: all), order kept."""
    if n is None:
        return examples
    if n < 0:
        raise ValueError(f"limit_per_subject must be >= 0, got {n}")
    seen: dict[str, int] = {}
    kept = []
    for ex in examples:
        seen[ex["subject"]] = seen.get(ex["subject"], 0) + 1
        if seen[ex["subject"]] <= n:
            kept.append(ex)
    return kept


def refuse_limit_per_subject(task: Task, limit_per_subject: int | None) -> None:
    """ValueError when ``limit_per_subject`` is set for a task without subjects (it would be ignored)."""
    if limit_per_subject is not None and not task.has_subjects:
        readers = ", ".join(sorted(c.name for c in _subclasses(Task) if c.has_subjects and c.name))
        raise ValueError(f"limit_per_subject is read only by tasks with subjects ({readers}); "
                         f"task {task.name!r} ignores it")


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


class Task:
    """Base class. Subclasses set ``spec`` (name and token cap are read from it) and implement
    ``_load_all`` and ``aggregate``; tasks without a grader implement ``score``; judged tasks ``judge``."""

    spec: ClassVar[TaskSpec]
    name: ClassVar[str] = ""  # = spec.name
    max_new_tokens: ClassVar[int] = 256  # = spec.max_new_tokens
    needs_judge: ClassVar[bool] = False  # the headline metric needs a judge model (alpaca_eval, sst)
    uses_judge: ClassVar[bool] = False  # judge() is called when a judge is given
    has_subjects: ClassVar[bool] = False  # examples have a "subject" and load() reads limit_per_subject (MMLU)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name, cls.max_new_tokens = cls.spec.name, cls.spec.max_new_tokens

    def __init__(self, data_path: str | Path | None = None):
        self.data_path = Path(data_path) if data_path is not None else self.spec.data_file()

    # -- data ---------------------------------------------------------------------------------
    def _load_all(self) -> list[dict]:
        raise NotImplementedError

    def load(self, limit: int | None = None, seed: int = 0, limit_per_subject: int | None = None) -> list[dict]:
        """Examples (dicts with a unique string ``id``); ``limit`` keeps the first N.
        ``limit_per_subject`` is refused: only tasks with ``has_subjects`` read it."""
        refuse_limit_per_subject(self, limit_per_subject)
        return first_n(self._load_all(), limit)

    # -- prompt and sampling ------------------------------------------------------------------
    def prompt_fields(self, example: dict) -> dict:
        """The values of the prompt template's ``{field}``s (the example itself by default)."""
        return example

    def instruction(self, example: dict) -> str:
        """The task prompt before any style wrapping: ``spec.prompt`` filled from the example."""
        return self.spec.prompt.format_map(self.prompt_fields(example))

    def format_prompt(self, example: dict, style: str = "zero_shot") -> str | list[dict]:
        return wrap_prompt(self.instruction(example), style)

    def sampling_params(self, style: str = "zero_shot", max_new_tokens: int | None = None,
                        temperature: float | None = None, seed: int | None = None) -> SamplingParams:
        """Greedy (temperature 0, top-p 1) unless ``temperature`` is given (then sampled with ``seed``),
        stopping at the style's turn marker and ``spec.stop``."""
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=0.0 if temperature is None else float(temperature),
            top_p=1.0,
            stop=list(STOP_BY_STYLE[style]) + list(self.spec.stop),
            seed=seed,
        )

    @classmethod
    def has_verifier(cls) -> bool:
        """True when the task grades outputs itself (``spec.grader``): several samples per example
        (pass@k) are scored by it. Judged tasks have none."""
        return getattr(cls, "spec", None) is not None and cls.spec.grader is not None

    # -- scoring ------------------------------------------------------------------------------
    @classmethod
    def grade(cls, answer: str | None, gold: str) -> bool:
        """The task's one grader (``spec.grader``): is ``answer`` (None = unparseable) equal to ``gold``?"""
        if cls.spec.grader is None:
            raise NotImplementedError(f"task {cls.spec.name!r} has no grader (it is judged)")
        return answer is not None and bool(cls.spec.grader(answer, gold))

    def score(self, example: dict, completion_text: str) -> dict:
        """Per-example score ``{"parsed", "gold", "correct"}`` from ``spec.parser`` and :meth:`grade`;
        ``parsed`` is None when unparseable. Tasks without a grader override this."""
        if self.spec.parser is None:
            raise NotImplementedError(f"task {self.name!r} has no parser: override score()")
        parsed = self.spec.parser(example, completion_text)
        gold = example[self.spec.target]
        return {"parsed": parsed, "gold": gold, "correct": self.grade(parsed, gold)}

    def harness_metrics(self, example: dict, output: str) -> dict:
        """``{spec.metric: value}`` of one cleaned output (what the lm-eval YAML's process_results returns)."""
        return {self.spec.metric: METRICS[self.spec.metric].value(self.score(example, output), output)}

    def aggregate(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def judge(self, records: list[dict], judge: Any) -> None:
        """Judged tasks add verdict fields to each record in place; others need nothing."""

    def write_outputs(self, records: list[dict], out_dir: Path, generator_name: str) -> list[Path]:
        """Task-specific output files (e.g. the AlpacaEval JSON array); paths written."""
        return []

    def sample_failures(self, records: list[dict], n: int = 5) -> list[dict]:
        """A few wrong/unsafe records for reports (first ``n`` in order)."""
        return [r for r in records if r.get("score", {}).get("correct") is False][:n]

    def reward(self, example: dict, text: str) -> dict:
        """RL reward from this task's parser and grader (:meth:`score`):
        ``format_reward`` = 1 if the answer parses, ``answer_reward`` = ``reward`` = 1 if it is correct."""
        s = self.score(example, text)
        answer = 1.0 if s.get("correct") else 0.0
        return {"reward": answer, "format_reward": 0.0 if s.get("parsed") is None else 1.0,
                "answer_reward": answer}


class LabelledTask(Task):
    """A generation task whose outputs a judge labels one at a time (``verdict``: the :class:`Judge` method,
    ``"safety"`` or ``"refusal"``); without a judge the score is the keyword refusal detector."""

    verdict: ClassVar[str]
    uses_judge = True

    def score(self, example: dict, completion_text: str) -> dict:
        return {"parsed": completion_text or None, "keyword_refusal": keyword_refusal(completion_text)}

    def judge(self, records: list[dict], judge: Any) -> None:
        """Adds ``record["judge"] = {"label", "raw"}``; raises when every verdict is invalid."""
        verdicts = getattr(judge, self.verdict)([(self.instruction(r["example"]), r["output"]) for r in records])
        require_some_valid(verdicts, self.verdict)
        for r, v in zip(records, verdicts):
            r["judge"] = {"label": v.label, "raw": v.raw}
