"""``EvalConfig``: every setting of one evaluation run, with its default stated once, here.

``alignkit eval``'s flags are generated from these fields (``--base-url`` for ``base_url``), the
chain's ``eval`` stage (``alignkit.config.EvalArgs``) is a subclass, and
:func:`alignkit.eval.runner.run_eval_config` runs one. :func:`problems` names every setting the
selected path would not read (``--judge`` with only ``--harness``, ``--timeout`` without
``--backend http``, ...) so that it is refused, never dropped.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from alignkit.eval.tasks import STYLES, TASKS, get_task_class, parse_task_list
from alignkit.generation.openai_http import OpenAIHTTPGenerator

BACKENDS = ("hf", "vllm", "http")
HTTP_OPTIONS = ("http_timeout", "http_retries", "concurrency", "http_retry_timeouts", "api_key_env")
# read only by the bundled-task runner (run_eval's tasks), never by lm-eval (--harness)
TASKS_ONLY = ("prompt", "judge", "resume", "fresh", "seed", "limit_per_subject", "backend", "base_url",
              "samples", "temperature", *HTTP_OPTIONS)
_HTTP = inspect.signature(OpenAIHTTPGenerator.__init__).parameters  # the HTTP options' one home


@dataclass
class EvalConfig:
    """One evaluation: bundled tasks (``tasks``, alignkit's runner) and/or lm-eval tasks (``harness``)."""

    model: str | None = field(default=None, metadata={
        "help": "Model folder, hub name, .gguf file, or the served model's name (backend http)."})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": f"Bundled tasks, comma-separated: {','.join(TASKS)}."})
    prompt: str = field(default="zero_shot", metadata={
        "help": "Prompt style of the bundled tasks.", "choices": list(STYLES)})
    limit: int | None = field(default=None, metadata={
        "help": "Examples per task (MMLU: a seeded sample; lm-eval: its --limit). None: all."})
    limit_per_subject: int | None = field(default=None, metadata={
        "help": "MMLU: the first N examples of each subject, in file order (then --limit samples from those). "
                "None: all. Other tasks refuse it."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the bundled tasks' example sampling and of the generation seeds of --samples."})
    samples: int = field(default=1, metadata={
        "help": "Generations per example (tasks with a verifier: gsm8k, mmlu), each graded; N > 1 reports "
                "pass@1 and pass@k (k = 1, 2, 4, ... up to N, and N) and needs --temperature > 0. Sample j's "
                "seed is derived from --seed and j."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature of the bundled tasks. None: each task's own (greedy, 0)."})
    output: str = field(default="eval_out", metadata={
        "help": "Output folder (results.json, reports, per-task predictions; lm-eval under harness/)."})
    backend: str = field(default="hf", metadata={
        "help": "Generation backend of the bundled tasks: hf (transformers), vllm, or http "
                "(an OpenAI-compatible server at base_url).", "choices": list(BACKENDS)})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server for backend http, e.g. http://localhost:8000/v1."})
    judge: str | None = field(default=None, metadata={
        "help": "Judge of the judged tasks: 'self' (the evaluated model) or a generator spec "
                "(hf:PATH, vllm:PATH, http://HOST:PORT/v1#NAME). None: those tasks generate only."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size (bundled tasks and lm-eval)."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Token cap overriding every task's own (lm-eval: its max_gen_toks for generating tasks). "
                "None: each task's default."})
    resume: bool | None = field(default=None, metadata={
        "help": "Continue: skip the examples already in <output>/<task>/predictions.jsonl and keep their "
                "verdicts. This is the default (the flag is accepted and changes nothing); false: start over "
                "as with fresh."})
    fresh: bool = field(default=False, metadata={
        "help": "Start over: move each task's old predictions/judgments aside to *.prev (never deleted) "
                "instead of continuing them; also the way to change settings that change the outputs."})
    harness: list[str] = field(default_factory=list, metadata={
        "help": "lm-eval tasks, comma-separated, e.g. mmlu,gsm8k,hellaswag,alignkit_gsm8k."})
    device: str | None = field(default=None, metadata={
        "help": "Device of backend hf and of lm-eval. None: cuda if available, else cpu."})
    http_timeout: float = field(default=_HTTP["timeout"].default, metadata={
        "help": "HTTP backend/judge: seconds per request (connect and read)."})
    http_retries: int = field(default=_HTTP["max_retries"].default, metadata={
        "help": "HTTP backend/judge: retries after the first attempt of a transient failure (connection "
                "reset, truncated body, 429, 5xx), with exponential backoff and jitter."})
    http_retry_timeouts: bool = field(default=_HTTP["retry_timeouts"].default, metadata={
        "help": "HTTP backend/judge: also re-send a request whose answer timed out (off: the server may "
                "still be working on it)."})
    concurrency: int = field(default=_HTTP["max_concurrency"].default, metadata={
        "help": "HTTP backend/judge: requests in flight at most."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "HTTP backend/judge: NAME of the environment variable holding the API key (sent as a "
                "Bearer token when set; the key itself is never stored or printed)."})

    def __post_init__(self) -> None:
        for name in ("tasks", "harness"):  # "a,b" (command line, run_eval's argument) -> ["a", "b"]
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [s.strip() for s in value.split(",") if s.strip()])

    def http_kwargs(self) -> dict:
        """OpenAIHTTPGenerator options (the API key read from ``api_key_env`` now, not kept)."""
        return {"timeout": self.http_timeout, "max_retries": self.http_retries, "max_concurrency": self.concurrency,
                "retry_timeouts": self.http_retry_timeouts, "api_key": os.environ.get(self.api_key_env) or None}


def default(f: dataclasses.Field):
    """A field's default value (its factory called)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def is_set(cfg: EvalConfig, name: str) -> bool:
    """True when ``cfg.name`` differs from its class's default."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    return getattr(cfg, name) != default(f)


def problems(cfg: EvalConfig, key: Callable[[str], str] = str) -> list[str]:
    """One-line messages for invalid values and for settings the selected path would ignore.

    ``key`` spells a field name as the user wrote it (``--base-url`` on the command line,
    ``base_url`` in a recipe)."""
    out = []
    if cfg.tasks:
        try:
            parse_task_list(cfg.tasks)
        except KeyError as err:
            out.append(err.args[0])
    if cfg.prompt not in STYLES:
        out.append(f"unknown {key('prompt')} {cfg.prompt!r}; valid: {', '.join(STYLES)}")
    if cfg.backend not in BACKENDS:
        out.append(f"unknown {key('backend')} {cfg.backend!r}; valid: {', '.join(BACKENDS)}")
    if cfg.tasks and cfg.backend == "http" and not cfg.base_url:
        out.append(f"{key('backend')} http needs {key('base_url')} (e.g. http://localhost:8000/v1)")
    if cfg.fresh and cfg.resume:
        out.append(f"{key('fresh')} (start over) and {key('resume')} (continue) contradict each other; give one")
    out += sampling_problems(cfg, key)
    if cfg.limit_per_subject is not None and cfg.limit_per_subject < 0:
        out.append(f"{key('limit_per_subject')} must be >= 0, got {cfg.limit_per_subject}")
    return out + unread(cfg, key)


def sampling_problems(cfg: EvalConfig, key: Callable[[str], str] = str) -> list[str]:
    """Messages for invalid ``samples``/``temperature``: N < 1, T < 0, N > 1 greedy, N > 1 on a judged task."""
    out = []
    if cfg.samples < 1:
        out.append(f"{key('samples')} must be >= 1, got {cfg.samples}")
    if cfg.temperature is not None and cfg.temperature < 0:
        out.append(f"{key('temperature')} must be >= 0, got {cfg.temperature}")
    if cfg.samples > 1 and not cfg.temperature:
        out.append(f"{key('samples')} {cfg.samples} needs {key('temperature')} > 0 "
                   f"(got {cfg.temperature}: greedy decoding makes every sample identical)")
    judged = [n for n in cfg.tasks if n in TASKS and not TASKS[n].has_verifier()]
    if cfg.samples > 1 and judged:
        out.append(f"{key('samples')} > 1 (pass@k) is read only by tasks with a verifier "
                   f"({', '.join(n for n in TASKS if TASKS[n].has_verifier())}); "
                   f"{key('tasks')} {','.join(judged)} are judged and refuse it")
    return out


def unread(cfg: EvalConfig, key: Callable[[str], str] = str) -> list[str]:
    """Messages for settings that no part of this evaluation reads."""
    if not cfg.tasks:
        runs = f"{key('harness')} (lm-eval)" if cfg.harness else "an eval without tasks"
        out = [f"{key(n)} is read only by the bundled-task runner ({key('tasks')}); {runs} ignores it"
               for n in TASKS_ONLY if is_set(cfg, n)]
    else:
        out = []
        judged = [n for n in cfg.tasks if n in TASKS and get_task_class(n).uses_judge]
        if is_set(cfg, "judge") and not judged:
            out.append(f"{key('judge')} is read by the judged tasks ({', '.join(n for n in TASKS if TASKS[n].uses_judge)}); "
                       f"{key('tasks')} {','.join(cfg.tasks)} ignore it")
        no_subjects = [n for n in cfg.tasks if n in TASKS and not TASKS[n].has_subjects]
        if is_set(cfg, "limit_per_subject") and no_subjects:
            out.append(f"{key('limit_per_subject')} is read only by tasks with subjects "
                       f"({', '.join(n for n in TASKS if TASKS[n].has_subjects)}); "
                       f"{key('tasks')} {','.join(no_subjects)} ignore it")
        http_judge = isinstance(cfg.judge, str) and cfg.judge.startswith(("http://", "https://"))
        if cfg.backend != "http" and is_set(cfg, "base_url"):
            out.append(f"{key('base_url')} is read only by {key('backend')} http; "
                       f"{key('backend')} {cfg.backend} ignores it")
        if cfg.backend != "http" and not http_judge:
            out += [f"{key(n)} is read by {key('backend')} http and an http(s) {key('judge')}; "
                    f"{key('backend')} {cfg.backend} with {key('judge')} {cfg.judge} ignores it"
                    for n in HTTP_OPTIONS if is_set(cfg, n)]
    if is_set(cfg, "device") and not cfg.harness and not (cfg.tasks and cfg.backend == "hf"):
        out.append(f"{key('device')} is read by the bundled tasks with {key('backend')} hf and by "
                   f"{key('harness')}; this eval ({key('backend')} {cfg.backend}, no harness) ignores it")
    return out
