"""``run_eval`` / ``run_eval_config``: generate, score, judge and report a model on a list of tasks
(and run lm-eval tasks when the config names some). One path: ``run_eval``'s keywords are
:class:`~alignkit.eval.config.EvalConfig`'s fields, with its defaults.

Layout of ``output_dir``::

    results.json  report.md  report.html          # written atomically at the end
    <task>/predictions.jsonl                      # one line per example, appended as it finishes
    <task>/judgments.jsonl                        # judged tasks: verdicts per example
    <task>/alpaca_eval_outputs.json | sst_outputs.jsonl   # task-specific outputs
    harness/                                      # lm-eval: results.json, samples_<task>.jsonl
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from importlib import metadata
from pathlib import Path

from alignkit.data.io import write_jsonl_atomic
from alignkit.eval.config import EvalConfig, default, problems
from alignkit.eval.harness import run_harness
from alignkit.eval.judge import Judge
from alignkit.eval.report import HEADLINE, PredictionLog, write_reports
from alignkit.eval.tasks import Task, clean_output, get_task, parse_task_list
from alignkit.generation.factory import make_generator
from alignkit.models import load_model

logger = logging.getLogger(__name__)


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
        return generator, {"requested": str(model), "kind": "http", "base_url": cfg.base_url}
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


def _generate(generator, task: Task, examples: list[dict], style: str, max_new_tokens):
    prompts = [task.format_prompt(e, style) for e in examples]
    params = task.sampling_params(style, max_new_tokens)
    fn = generator.chat if style == "chat" else generator.generate
    return prompts, fn(prompts, params)


def _record(task: Task, example: dict, prompt, completion, style: str) -> dict:
    output = clean_output(completion.text, style)
    score = task.score(example, output)
    return {"id": example["id"], "example": example, "prompt": prompt, "generation": completion.text,
            "output": output, "parsed": score.get("parsed"), "score": score,
            "finish_reason": completion.finish_reason, "num_tokens": completion.num_tokens}


def generate_task(generator, task: Task, examples: list[dict], log: PredictionLog, *, style: str,
                  max_new_tokens, batch_size: int) -> dict:
    """Generate + score the examples not yet in ``log``, appending each record; returns throughput."""
    done = log.done_ids()
    todo = [e for e in examples if e["id"] not in done]
    if done:
        logger.info("[%s] resume: %d done, %d to go", task.name, len(examples) - len(todo), len(todo))
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(todo), batch_size):
        # 1. generate one batch
        batch = todo[i : i + batch_size]
        prompts, completions = _generate(generator, task, batch, style, max_new_tokens)
        # 2. score and append each record as soon as it exists
        for example, prompt, completion in zip(batch, prompts, completions):
            log.append(_record(task, example, prompt, completion, style))
            tokens += completion.num_tokens
        # 3. progress
        elapsed = time.perf_counter() - start
        logger.info("[%s] %d/%d examples  %.2f ex/s  %.1f tok/s", task.name, len(done) + i + len(batch),
                    len(examples), (i + len(batch)) / elapsed, tokens / elapsed)
    wall = time.perf_counter() - start
    return {"examples": len(todo), "wall_s": wall, "examples_per_s": len(todo) / wall if wall else 0.0,
            "generated_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0}


def judge_task(task: Task, records: list[dict], judge, out_dir: Path, resume: bool) -> None:
    """Judge records without a verdict (earlier verdicts kept on resume); write judgments.jsonl."""
    path = out_dir / "judgments.jsonl"
    old = {r["id"]: r for r in PredictionLog(path, resume=True).read()} if resume else {}
    for r in records:
        if r["id"] in old and old[r["id"]].get("output") == r["output"]:
            r["judge"] = old[r["id"]]["judge"]
    todo = [r for r in records if "judge" not in r]
    logger.info("[%s] judging %d outputs with %s", task.name, len(todo), judge.name)
    task.judge(todo, judge)
    write_jsonl_atomic(path, [{"id": r["id"], "output": r["output"], "judge": r["judge"]} for r in records])


def run_task(task: Task, generator, out_dir: Path, *, limit, seed, style, max_new_tokens, batch_size,
             resume, judge, limit_per_subject=None) -> tuple[dict, dict, list[dict]]:
    """One task end to end -> (metrics, throughput, sample failures)."""
    examples = task.load(limit, seed, limit_per_subject=limit_per_subject)
    log = PredictionLog(out_dir / "predictions.jsonl", resume=resume)
    throughput = generate_task(generator, task, examples, log, style=style, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    by_id = {r["id"]: r for r in log.read()}
    records = [by_id[e["id"]] for e in examples]  # example order; stale ids of other limits dropped
    if judge is not None and task.uses_judge:
        judge_task(task, records, judge, out_dir, resume)
    elif task.needs_judge:
        logger.warning("[%s] no judge given: generation only, no judged metric", task.name)
    task.write_outputs(records, out_dir, generator.name)
    return task.aggregate(records), throughput, task.sample_failures(records, n=3)


def run_eval(model, tasks, output_dir, **settings) -> dict:
    """Evaluate ``model`` (a path/name loaded with ``backend``, or a Generator) on ``tasks``.

    ``settings``: any other :class:`~alignkit.eval.config.EvalConfig` field (limit, prompt, backend,
    judge (also a Judge or Generator), max_new_tokens, batch_size, resume, seed, base_url, HTTP
    options, harness, device), with EvalConfig's defaults. Returns :func:`run_eval_config`'s dict.
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
    results = _run_tasks(cfg, model) if cfg.tasks else {}
    if cfg.harness:
        results["harness"] = _run_harness(cfg, model)
    return results


def _run_tasks(cfg: EvalConfig, model) -> dict:
    """The bundled tasks: generate/score/judge each, writing the run's files after each task."""
    names, out = parse_task_list(cfg.tasks), Path(cfg.output)
    generator, source = build_generator(model, cfg)
    judge_obj = build_judge(cfg.judge, generator, cfg.http_kwargs())
    recorded = {f.name: getattr(cfg, f.name) for f in _SETTINGS if f.name != "judge"}  # never the API key
    results = {"metrics": {}, "throughput": {}, "samples": {}, "model_source": source,
               "generator": generator.name, "judge": judge_obj.name if judge_obj else None,
               "config": {**recorded, "tasks": names}, "versions": _versions()}
    for name in names:
        # 1. generate/score/judge one task; 2. write the run's files so far (atomic)
        metrics, thr, samples = run_task(get_task(name), generator, out / name, limit=cfg.limit, seed=cfg.seed,
                                         style=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.batch_size, resume=cfg.resume, judge=judge_obj,
                                         limit_per_subject=cfg.limit_per_subject)
        results["metrics"][name], results["throughput"][name], results["samples"][name] = metrics, thr, samples
        write_reports(out, results)
    logger.info("eval done: %s", summary_line(results))
    return results


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
