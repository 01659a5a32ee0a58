"""``run_eval`` / ``run_eval_config``: generate, score, judge and report a model on a list of tasks
(and run lm-eval tasks when the config names some). One path: ``run_eval``'s keywords are
:class:`~alignkit.eval.config.EvalConfig`'s fields, with its defaults.

Layout of ``output_dir``::

    results.json  report.md  report.html          # written atomically after each task
    <task>/predictions.jsonl                      # one line per example, appended as it finishes
    <task>/run.json                               # the settings that change outputs + timed segments
    <task>/failures.jsonl                         # examples whose generation failed (id, error)
    <task>/judgments.jsonl                        # judged tasks: verdicts per example
    <task>/alpaca_eval_outputs.json | sst_outputs.jsonl   # task-specific outputs
    harness/                                      # lm-eval: results.json, samples_<task>.jsonl

Finished work is never deleted. A rerun continues (examples in predictions.jsonl are skipped) when
the settings recorded in run.json match; otherwise it refuses (:class:`SettingsChanged`) unless
``fresh``, which moves the old files aside to ``*.prev`` (``*.prev2``, ... when taken). A generator
that takes ``on_result`` (the HTTP backend) hands over each example as its request finishes: it is
saved at once, and a failed request fails only its example (:class:`EvalIncomplete` at the end).
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import logging
import time
from importlib import metadata
from pathlib import Path

from alignkit.data.io import write_json_atomic, write_jsonl_atomic
from alignkit.eval.config import EvalConfig, default, problems
from alignkit.eval.harness import run_harness
from alignkit.eval.judge import Judge
from alignkit.eval.report import HEADLINE, PredictionLog, throughput_of, write_reports
from alignkit.eval.tasks import Task, clean_output, get_task, parse_task_list
from alignkit.generation.base import accepts_on_result
from alignkit.generation.factory import make_generator
from alignkit.generation.openai_http import GenerationHTTPError, redact_url
from alignkit.models import load_model

logger = logging.getLogger(__name__)

RUN_FILES = ("predictions.jsonl", "judgments.jsonl", "failures.jsonl", "run.json")  # moved aside together
OUTPUT_SETTINGS = ("backend", "prompt", "max_new_tokens", "limit", "seed", "limit_per_subject")
# recorded only when set (run.json files written before they existed stay valid at their defaults)
SAMPLING_SETTINGS = {"samples": 1, "temperature": None}


class SettingsChanged(ValueError):
    """A rerun whose output-changing settings differ from those recorded next to the predictions."""


class EvalIncomplete(RuntimeError):
    """Some examples failed (recorded in <task>/failures.jsonl); every other one is saved and scored.
    ``results`` is the results.json content written, ``failed`` the count per task."""

    def __init__(self, message: str, results: dict, failed: dict[str, int]) -> None:
        super().__init__(message)
        self.results, self.failed = results, failed


def _versions() -> dict:
    out = {}
    for pkg in ("alignkit", "torch", "transformers", "trl", "peft", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _is_generator(obj) -> bool:
    return all(hasattr(obj, a) for a in ("generate", "chat", "name"))


def build_generator(model, cfg: EvalConfig):
    """(Generator, model_source dict) from a Generator, or a model path/name and ``cfg.backend``."""
    if _is_generator(model):
        return model, {"requested": model.name, "kind": "generator"}
    if cfg.backend == "hf":  # loaded here (not by the factory) so that the ModelSource is recorded
        hf_model, tokenizer, source = load_model(str(model), for_generation=True, device=cfg.device)
        generator = make_generator(f"hf:{model}", model=hf_model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        return generator, source.to_dict()
    if cfg.backend == "vllm":
        return make_generator(f"vllm:{model}"), {"requested": str(model), "kind": "vllm"}
    if cfg.backend == "http":
        if not cfg.base_url:
            raise ValueError("backend 'http' needs base_url (e.g. http://localhost:8000/v1)")
        generator = make_generator(cfg.base_url, model=str(model), **cfg.http_kwargs())
        return generator, {"requested": str(model), "kind": "http", "base_url": redact_url(cfg.base_url)}
    raise ValueError(f"unknown backend {cfg.backend!r}; valid backends: hf, vllm, http")


def build_judge(judge, generator, http_kwargs: dict | None = None):
    """None | Judge | Generator | "self" (the evaluated model) | a make_generator spec string
    (``http_kwargs``: OpenAIHTTPGenerator options for an http(s) spec)."""
    if judge is None or isinstance(judge, Judge):
        return judge
    if isinstance(judge, str) and judge == "self":
        return Judge(generator)
    if _is_generator(judge):
        return Judge(judge)
    spec = str(judge)
    return Judge(make_generator(spec, **(http_kwargs or {}) if spec.startswith(("http://", "https://")) else {}))


# ----------------------------------------------------------------------------- settings and segments
def output_settings(cfg: EvalConfig, model) -> dict:
    """The settings that change a task's outputs, recorded in <task>/run.json and compared on rerun."""
    identity = model.name if _is_generator(model) else str(model)
    out = {"model": identity, "model_files": _model_files(model)}
    out |= {k: getattr(cfg, k) for k in OUTPUT_SETTINGS if hasattr(cfg, k)}
    return out | {k: getattr(cfg, k) for k, unset in SAMPLING_SETTINGS.items() if getattr(cfg, k, unset) != unset}


def _model_files(model) -> str | None:
    """A local model's files in brief (count, bytes, newest mtime): a retrained folder differs."""
    if _is_generator(model) or not Path(str(model)).expanduser().exists():
        return None
    path = Path(str(model)).expanduser()
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
    stats = [f.stat() for f in files]
    return (f"{len(stats)} files, {sum(s.st_size for s in stats)} bytes, "
            f"newest mtime_ns {max((s.st_mtime_ns for s in stats), default=0)}")


def changed_settings(old: dict, new: dict) -> list[str]:
    """``["max_new_tokens: 4 -> 8", ...]`` for every key whose value differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def move_aside(task_dir: Path) -> str | None:
    """Rename the task's RUN_FILES to ``NAME.prev`` (or ``.prev2``, ... when taken); returns the suffix."""
    present = [task_dir / n for n in RUN_FILES if (task_dir / n).exists()]
    if not present:
        return None
    k = 1
    while any((task_dir / f"{n}.prev{k if k > 1 else ''}").exists() for n in RUN_FILES):
        k += 1
    suffix = f".prev{k if k > 1 else ''}"
    for path in present:
        path.rename(path.with_name(path.name + suffix))
    logger.info("%s: fresh start; earlier files moved aside to *%s", task_dir, suffix)
    return suffix


def prepare_task_dir(task_dir: Path, settings: dict, *, fresh: bool) -> list[dict]:
    """Fresh: move earlier files aside. Else check the recorded settings (SettingsChanged when they
    differ) and return the earlier timed segments. Writes run.json with ``settings``."""
    run_file, segments = task_dir / "run.json", []
    if fresh:
        move_aside(task_dir)
    else:
        check_settings(task_dir, settings)
        if run_file.exists():
            recorded = _read_json(run_file)
            segments = recorded.get("segments", []) if recorded.get("settings") == settings else []
        elif (task_dir / "predictions.jsonl").exists():
            logger.warning("%s: predictions without run.json (an older alignkit): continuing them unchecked",
                           task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, {"settings": settings, "segments": segments})
    return segments


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); move it away or use --fresh") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- one task
def _record(task: Task, example: dict, prompt, completion, style: str) -> dict:
    output = clean_output(completion.text, style)
    score = task.score(example, output)
    return {"id": example["id"], "example": example, "prompt": prompt, "generation": completion.text,
            "output": output, "parsed": score.get("parsed"), "score": score,
            "finish_reason": completion.finish_reason, "num_tokens": completion.num_tokens}


#: batches per generate call for backends that take ``on_result`` (progress is logged once per call)
CHUNK_BATCHES = 8


def sample_seed(seed: int, j: int) -> int:
    """The generation seed of sample ``j`` (0-based) of a run with ``--seed seed``."""
    return seed * 1_000_003 + j


def _generate_batch(generator, task: Task, batch: list[dict], style: str, params, save) -> list:
    """Generate ``batch`` with ``params``, calling ``save(example, prompt, completion)`` for each completion
    (as each request finishes when the backend takes ``on_result``); returns [(example, error)] of failures."""
    prompts = [task.format_prompt(e, style) for e in batch]
    fn = generator.chat if style == "chat" else generator.generate
    failed = []
    if accepts_on_result(fn):
        def on_result(i, result):
            if isinstance(result, Exception):
                failed.append((batch[i], result))
            else:
                save(batch[i], prompts[i], result)

        fn(prompts, params, on_result=on_result)
    else:
        for example, prompt, completion in zip(batch, prompts, fn(prompts, params)):
            save(example, prompt, completion)
    return failed


def _sample_entry(task: Task, example: dict, completion, style: str, seed: int) -> dict:
    output = clean_output(completion.text, style)
    score = task.score(example, output)
    return {"seed": seed, "generation": completion.text, "output": output, "parsed": score.get("parsed"),
            "correct": bool(score.get("correct")), "finish_reason": completion.finish_reason,
            "num_tokens": completion.num_tokens}


def _generate_samples(generator, task: Task, batch: list[dict], style: str, params_of, samples: int,
                      save) -> list:
    """``samples`` generations of each example of ``batch`` (sample j with ``params_of(j)``); calls
    ``save(example, prompt, [completion per sample])`` for each example whose samples all came back;
    returns [(example, first error)] of the others."""
    got: dict[str, list] = {e["id"]: [None] * samples for e in batch}
    prompts: dict[str, object] = {}
    failed: dict[str, tuple] = {}
    for j in range(samples):
        def keep(example, prompt, completion, j=j):
            got[example["id"]][j], prompts[example["id"]] = completion, prompt

        for example, err in _generate_batch(generator, task, batch, style, params_of(j), keep):
            failed.setdefault(example["id"], (example, err))
    for example in batch:
        if example["id"] not in failed:
            save(example, prompts[example["id"]], got[example["id"]])
    return list(failed.values())


def generate_task(generator, task: Task, examples: list[dict], log: PredictionLog, *, style: str,
                  max_new_tokens, batch_size: int, on_progress=None, samples: int = 1,
                  temperature: float | None = None, seed: int = 0) -> tuple[dict, list[dict]]:
    """Generate + score the examples not yet in ``log``, appending each record as it exists.

    ``temperature`` None: the task's greedy params; else sampled, sample j seeded with
    :func:`sample_seed` (seed, j). ``samples`` > 1: each example is generated that many times and its
    record (saved once all its samples are back; the top-level fields are the first sample's) holds
    them in ``samples`` [{seed, generation, output, parsed, correct, finish_reason, num_tokens}].

    Returns (this segment {started_at, examples, wall_s, generated_tokens}, failures [{id, error}]);
    ``on_progress(segment, failures)`` is called after each batch and once more on the way out (also
    on Ctrl-C or a crash). A batch of which no request succeeded stops the task (its first error is
    raised): the server is down or refuses every request."""
    done = log.done_ids()
    todo = [e for e in examples if e["id"] not in done]
    if done:
        logger.info("[%s] resume: %d done, %d to go", task.name, len(examples) - len(todo), len(todo))
    segment = {"started_at": _now(), "examples": 0, "wall_s": 0.0, "generated_tokens": 0}
    failures: list[dict] = []
    start = time.perf_counter()

    def params_of(j: int):
        if temperature is None:
            return task.sampling_params(style, max_new_tokens)
        return task.sampling_params(style, max_new_tokens, temperature=temperature, seed=sample_seed(seed, j))

    def save(example, prompt, completion):
        completions = completion if isinstance(completion, list) else [completion]
        record = _record(task, example, prompt, completions[0], style)
        if samples > 1:
            record["samples"] = [_sample_entry(task, example, c, style, sample_seed(seed, j))
                                 for j, c in enumerate(completions)]
        log.append(record)
        segment["examples"] += 1
        segment["generated_tokens"] += sum(c.num_tokens for c in completions)

    def progress():
        segment["wall_s"] = time.perf_counter() - start
        if on_progress is not None:
            on_progress(segment, failures)

    # a backend that reports each result as it finishes (HTTP, HF continuous batching) gets longer chunks: records
    # are still saved one by one, and HF refills a finished row's slot from the same call
    fn = generator.chat if style == "chat" else generator.generate
    chunk = batch_size * (CHUNK_BATCHES if accepts_on_result(fn) else 1)
    try:
        for i in range(0, len(todo), chunk):
            batch = todo[i : i + chunk]
            if samples > 1:
                failed = _generate_samples(generator, task, batch, style, params_of, samples, save)
            else:
                failed = _generate_batch(generator, task, batch, style, params_of(0), save)
            failures += [{"id": e["id"], "error": str(err)} for e, err in failed]
            if failed and len(failed) == len(batch):  # nothing came back: stop here, with the first error
                example, err = failed[0]
                if isinstance(err, GenerationHTTPError):
                    raise GenerationHTTPError(f"[{task.name}] example {example['id']}: {err}", url=err.url,
                                              index=err.index) from err
                raise err
            progress()
            logger.info("[%s] %d/%d examples  %.2f ex/s  %.1f tok/s", task.name, len(done) + segment["examples"],
                        len(examples), segment["examples"] / segment["wall_s"],
                        segment["generated_tokens"] / segment["wall_s"])
    finally:
        progress()
    return segment, failures


def judge_task(task: Task, records: list[dict], judge, out_dir: Path, resume: bool = True) -> None:
    """Judge records without a verdict (earlier verdicts of the same judge on the same output kept);
    write judgments.jsonl."""
    path = out_dir / "judgments.jsonl"
    old = {r["id"]: r for r in PredictionLog(path, resume=True).read()} if resume else {}
    for r in records:
        prev = old.get(r["id"])
        if prev and prev.get("output") == r["output"] and prev.get("judged_by", judge.name) == judge.name:
            r["judge"] = prev["judge"]
    todo = [r for r in records if "judge" not in r]
    logger.info("[%s] judging %d outputs with %s", task.name, len(todo), judge.name)
    task.judge(todo, judge)
    write_jsonl_atomic(path, [{"id": r["id"], "output": r["output"], "judge": r["judge"], "judged_by": judge.name}
                              for r in records])


def run_task(task: Task, generator, out_dir: Path, *, limit, seed, style, max_new_tokens, batch_size,
             judge, settings: dict | None = None, fresh: bool = False, resume=None,
             limit_per_subject=None, samples: int = 1, temperature: float | None = None
             ) -> tuple[dict, dict, list, list]:
    """One task end to end -> (metrics, throughput of the whole run, sample failures, failed examples).

    ``samples`` > 1 (pass@k; tasks with a verifier only, ValueError otherwise) and ``temperature``:
    see :func:`generate_task` (seeded from ``seed``).
    ``settings`` (:func:`output_settings`) are checked against / recorded in run.json; ``fresh``
    moves the earlier files aside. ``resume`` is EvalConfig's (None/True: continue; False: fresh)."""
    if samples > 1 and not task.has_verifier():
        raise ValueError(f"samples > 1 (pass@k) needs a task with a verifier; task {task.name!r} is judged")
    examples = task.load(limit, seed, limit_per_subject=limit_per_subject)
    fresh = fresh or resume is False
    earlier = prepare_task_dir(out_dir, settings or {}, fresh=fresh)
    log = PredictionLog(out_dir / "predictions.jsonl", resume=True)

    def on_progress(segment, failures):
        segments = earlier + ([dict(segment)] if segment["examples"] else [])
        write_json_atomic(out_dir / "run.json", {"settings": settings or {}, "segments": segments})
        if failures or (out_dir / "failures.jsonl").exists():
            write_jsonl_atomic(out_dir / "failures.jsonl", failures)

    segment, failed = generate_task(generator, task, examples, log, style=style, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, on_progress=on_progress, samples=samples,
                                    temperature=temperature, seed=seed)
    by_id = {r["id"]: r for r in log.read()}
    records = [by_id[e["id"]] for e in examples if e["id"] in by_id]  # example order; failed ones absent
    if judge is not None and task.uses_judge:
        judge_task(task, records, judge, out_dir)
    elif task.needs_judge:
        logger.warning("[%s] no judge given: generation only, no judged metric", task.name)
    task.write_outputs(records, out_dir, generator.name)
    segments = earlier + ([segment] if segment["examples"] else [])
    return task.aggregate(records), throughput_of(segments), task.sample_failures(records, n=3), failed


def run_eval(model, tasks, output_dir, **settings) -> dict:
    """Evaluate ``model`` (a path/name loaded with ``backend``, or a Generator) on ``tasks``.

    ``settings``: any other :class:`~alignkit.eval.config.EvalConfig` field (limit, prompt, backend,
    judge (also a Judge or Generator), max_new_tokens, batch_size, fresh, seed, base_url, HTTP
    options, harness, device), with EvalConfig's defaults. Returns :func:`run_eval_config`'s dict;
    raises :class:`SettingsChanged` (earlier predictions made with other settings, nothing done) or
    :class:`EvalIncomplete` (after writing the results, when some examples failed).
    """
    return run_eval_config(EvalConfig(tasks=tasks, output=str(output_dir), **settings), model=model)


_SETTINGS = [f for f in dataclasses.fields(EvalConfig) if f.name not in ("model", "tasks", "output")]
run_eval.__signature__ = inspect.Signature(  # what help(run_eval) shows: EvalConfig's defaults
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("model", "tasks", "output_dir")]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default(f)) for f in _SETTINGS])


def run_eval_config(cfg: EvalConfig, model=None) -> dict:
    """Run ``cfg`` on ``model`` (default ``cfg.model``; a Generator for the bundled tasks only).

    Returns the results.json content of the bundled tasks (metrics, config, versions,
    model_source, throughput; ``{}`` without tasks) plus ``"harness"``: run_harness's summary
    when ``cfg.harness`` is set. A setting that this run would ignore raises ValueError.
    """
    model = cfg.model if model is None else model
    if cfg.tasks:
        parse_task_list(cfg.tasks)  # KeyError naming the valid tasks
    errors = problems(cfg) + ([] if model is not None else ["no model given"])
    if not cfg.tasks and not cfg.harness:
        errors.append("no tasks and no harness tasks given")
    if errors:
        raise ValueError("; ".join(errors))
    incomplete = None
    try:
        results = _run_tasks(cfg, model) if cfg.tasks else {}
    except EvalIncomplete as err:  # the harness still runs; the failure is raised at the end
        incomplete, results = err, err.results
    if cfg.harness:
        results["harness"] = _run_harness(cfg, model)
    if incomplete is not None:
        raise incomplete
    return results


def _run_tasks(cfg: EvalConfig, model) -> dict:
    """The bundled tasks: generate/score/judge each, writing the run's files after each task."""
    names, out = parse_task_list(cfg.tasks), Path(cfg.output)
    settings = output_settings(cfg, model)
    if not cfg.fresh and cfg.resume is not False:  # refuse a mismatch before loading anything
        for name in names:
            check_settings(out / name, {"task": name, **settings})
    generator, source = build_generator(model, cfg)
    judge_obj = build_judge(cfg.judge, generator, cfg.http_kwargs())
    recorded = {f.name: getattr(cfg, f.name) for f in _SETTINGS if f.name != "judge"}  # never the API key
    recorded["base_url"] = redact_url(cfg.base_url) if cfg.base_url else cfg.base_url
    results = {"metrics": {}, "throughput": {}, "samples": {}, "failed": {}, "model_source": source,
               "generator": generator.name, "judge": redact_url(judge_obj.name) if judge_obj else None,
               "config": {**recorded, "tasks": names}, "versions": _versions()}
    for name in names:
        # 1. generate/score/judge one task; 2. write the run's files so far (atomic)
        metrics, thr, samples, failed = run_task(
            get_task(name), generator, out / name, limit=cfg.limit, seed=cfg.seed, style=cfg.prompt,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, judge=judge_obj,
            settings={"task": name, **settings}, fresh=cfg.fresh, resume=cfg.resume,
            limit_per_subject=cfg.limit_per_subject, samples=cfg.samples, temperature=cfg.temperature)
        results["metrics"][name], results["throughput"][name], results["samples"][name] = metrics, thr, samples
        if failed:
            results["failed"][name] = {"n": len(failed), "first": failed[0]}
        write_reports(out, results)
    logger.info("eval done: %s", summary_line(results))
    if results["failed"]:
        counts = {k: v["n"] for k, v in results["failed"].items()}
        first = next(iter(results["failed"].values()))["first"]
        raise EvalIncomplete(f"{sum(counts.values())} example(s) failed ("
                             + ", ".join(f"{k} {n}" for k, n in counts.items())
                             + f"; see <task>/failures.jsonl); first: {first['error']}", results, counts)
    return results


def check_settings(task_dir: Path, settings: dict) -> None:
    """SettingsChanged when ``task_dir`` holds predictions made with other output-changing settings."""
    run_file = task_dir / "run.json"
    if run_file.exists() and (task_dir / "predictions.jsonl").exists():
        diff = changed_settings(_read_json(run_file).get("settings", {}), settings)
        if diff:
            raise SettingsChanged(
                f"{task_dir}: its predictions were made with other settings ({'; '.join(diff)}); rerun with "
                "--fresh (fresh: true) to start over (the old files are moved to *.prev), or give another output")


def _run_harness(cfg: EvalConfig, model) -> dict:
    """lm-eval on ``model`` (a path or name); ``max_new_tokens`` becomes lm-eval's ``max_gen_toks``."""
    if not isinstance(model, (str, Path)):
        raise TypeError("harness: lm-eval loads the model itself; give a model path or name, not a Generator")
    gen_kwargs = None if cfg.max_new_tokens is None else {"max_gen_toks": cfg.max_new_tokens}
    return run_harness(str(model), list(cfg.harness), Path(cfg.output) / "harness", limit=cfg.limit,
                       batch_size=cfg.batch_size, device=cfg.device, gen_kwargs=gen_kwargs)


def summary_line(results: dict) -> str:
    """``"gsm8k accuracy=0.5000; sst n=2"``: each task's headline metric."""
    parts = []
    for name, m in results["metrics"].items():
        key = HEADLINE.get(name, ("n", True))[0]
        parts.append(f"{name} {key}={m[key]:.4f}" if isinstance(m.get(key), float) else f"{name} n={m.get('n')}")
    return "; ".join(parts)
