"""Each evaluation task defined once, as data (lm-eval's lesson).

A :class:`TaskSpec` holds everything declarative about a task: its bundled data file, prompt
template, stop strings, token cap, parser, grader and per-example metric. Both consumers read it:

* the runner's :class:`~alignkit.eval.tasks.base.Task` (``Task.spec``): ``instruction`` fills the
  template, ``sampling_params`` uses the token cap and stop strings, ``score`` runs parser and grader;
* :func:`alignkit.eval.harness.task_dir` generates the lm-eval YAML of each spec (``alignkit_<name>``),
  whose hooks (``lm_eval_tasks/utils.py``) call the same Task, so the two paths cannot drift.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit import resources

HARNESS_STYLE = "zero_shot"  # the prompt style of the generated lm-eval tasks (their hooks and stop strings)
Parser = Callable[[dict, str], str | None]
Grader = Callable[[str | None, str], bool]


def _correct(score: dict, output: str) -> float:
    return float(bool(score["correct"]))


def _output_chars(score: dict, output: str) -> float:
    return float(len(output))


def _keyword_refusal(score: dict, output: str) -> float:
    return float(bool(score["keyword_refusal"]))


@dataclass(frozen=True)
class Metric:
    """A per-example metric lm-eval averages: its value from ``(Task.score(...), cleaned output)``."""

    value: Callable[[dict, str], float] = field(metadata={"help": "(score dict, output) -> float."})
    higher_is_better: bool = field(default=True, metadata={"help": "Direction, for lm-eval's metric_list."})


METRICS: dict[str, Metric] = {
    "exact_match": Metric(_correct),
    "acc": Metric(_correct),
    "output_chars": Metric(_output_chars),
    "keyword_refusal": Metric(_keyword_refusal, higher_is_better=False),
}


@dataclass(frozen=True)
class TaskSpec:
    """The declarative definition of one evaluation task (see the module docstring)."""

    name: str = field(metadata={"help": "Task name in alignkit's registry; lm-eval's is alignkit_<name>."})
    data: str = field(metadata={"help": "Bundled data under resources/data ('{split}' is filled in), e.g. "
                                        "'gsm8k/{split}.jsonl'; a folder for MMLU."})
    prompt: str = field(metadata={"help": "Task prompt template; {field}s come from Task.prompt_fields(example). "
                                          "The prompt style (zero_shot, alpaca, chat) wraps it."})
    max_new_tokens: int = field(metadata={"help": "Generation cap (runner default and lm-eval max_gen_toks)."})
    metric: str = field(metadata={"help": f"Per-example metric lm-eval averages: one of {', '.join(METRICS)}."})
    target: str = field(default="", metadata={"help": "Example field with the gold answer (the grader's gold, "
                                                      "lm-eval's doc_to_target); '' for judged tasks."})
    stop: tuple[str, ...] = field(default=(), metadata={
        "help": "Stop strings added to the prompt style's own turn marker (e.g. '# Query:')."})
    parser: Parser | None = field(default=None, metadata={
        "help": "(example, completion) -> the answer, or None when unparseable; None for judged tasks."})
    grader: Grader | None = field(default=None, metadata={
        "help": "(answer, gold) -> correct. The task's one grader: eval score, RL reward and quickstart."})
    subsets: tuple[str, ...] = field(default=(), metadata={
        "help": "lm-eval only: one task alignkit_<name>_<subset> per entry, grouped as alignkit_<name>."})
    subset_data: str = field(default="", metadata={
        "help": "Data file of one subset under resources/data ('{subset}' and '{split}' filled in)."})
    description: str = field(default="", metadata={"help": "One line for the generated YAML's header."})

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if (self.parser is None) != (self.grader is None) or (self.grader is not None and not self.target):
            raise ValueError(f"task {self.name!r}: parser, grader and target come together")
        if bool(self.subsets) != bool(self.subset_data):
            raise ValueError(f"task {self.name!r}: subsets and subset_data come together")

    def data_file(self, split: str = "test") -> Path:
        """Absolute path of the bundled data for ``split``."""
        return resources.DATA / self.data.format(split=split)

    def subset_file(self, subset: str, split: str = "test") -> Path:
        """Absolute path of one subset's bundled data (lm-eval subtasks)."""
        return resources.DATA / self.subset_data.format(subset=subset, split=split)
