"""``run_eval``: generate, score, judge and report a model on a list of tasks.

Layout of ``output_dir``::

    results.json  report.md  report.html          # written atomically at the end
    <task>/predictions.jsonl                      # one line per example, appended as it finishes
    <task>/judgments.jsonl                        # judged tasks: verdicts per example
    <task>/alpaca_eval_outputs.json | sst_outputs.jsonl   # task-specific outputs
"""
from __future__ import annotations

import logging
import time
from importlib import metadata
from pathlib import Path

from alignkit.data.io import write_jsonl_atomic
from alignkit.eval.report import PredictionLog, write_reports
from alignkit.eval.tasks import STYLES, Task, clean_output, get_task, parse_task_list

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


def _load_hf(model: str, batch_size: int):
    """HFGenerator over alignkit.models.load_model (transformers directly if that module is absent)."""
    from alignkit.generation.hf import HFGenerator

    try:
        from alignkit.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        hf_model, tokenizer, source = load_model(model, for_generation=True)
        source = source.to_dict()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype="auto").eval()
        source = {"requested": model, "kind": "folder" if Path(model).is_dir() else "hub", "path": model}
    return HFGenerator(hf_model, tokenizer, batch_size=batch_size, name=f"hf:{model}"), source


def build_generator(model, backend: str = "hf", batch_size: int = 8, base_url: str | None = None):
    """(Generator, model_source dict) from a Generator or a model path/name and a backend."""
    if _is_generator(model):
        return model, {"requested": model.name, "kind": "generator"}
    if backend == "hf":
        return _load_hf(str(model), batch_size)
    from alignkit.generation import make_generator

    if backend == "vllm":
        return make_generator(f"vllm:{model}"), {"requested": str(model), "kind": "vllm"}
    if backend == "http":
        if not base_url:
            raise ValueError("backend 'http' needs base_url (e.g. http://localhost:8000/v1)")
        return make_generator(base_url, model=str(model)), {"requested": str(model), "kind": "http",
                                                             "base_url": base_url}
    raise ValueError(f"unknown backend {backend!r}; valid backends: hf, vllm, http")


def build_judge(judge, generator):
    """None | Judge | Generator | "self" (the evaluated model) | a make_generator spec string."""
    from alignkit.eval.judge import Judge

    if judge is None or isinstance(judge, Judge):
        return judge
    if isinstance(judge, str) and judge == "self":
        return Judge(generator)
    if _is_generator(judge):
        return Judge(judge)
    from alignkit.generation import make_generator

    return Judge(make_generator(str(judge)))


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
             resume, judge) -> tuple[dict, dict, list[dict]]:
    """One task end to end -> (metrics, throughput, sample failures)."""
    examples = task.load(limit, seed)
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


def run_eval(model, tasks: list[str], output_dir: str, *, limit=None, prompt="zero_shot", backend="hf",
             judge=None, max_new_tokens=None, batch_size=8, resume=False, seed=0, base_url=None) -> dict:
    """Evaluate ``model`` (a path/name loaded with ``backend``, or a Generator) on ``tasks``.

    Returns the results.json content: metrics, config, versions, model_source, throughput.
    """
    names = parse_task_list(tasks)
    if prompt not in STYLES:
        raise ValueError(f"unknown prompt style {prompt!r}; valid styles: {', '.join(STYLES)}")
    out = Path(output_dir)
    generator, source = build_generator(model, backend, batch_size, base_url)
    judge_obj = build_judge(judge, generator)
    results = {"metrics": {}, "throughput": {}, "samples": {}, "model_source": source,
               "generator": generator.name, "judge": judge_obj.name if judge_obj else None,
               "config": {"tasks": names, "limit": limit, "prompt": prompt, "backend": backend, "seed": seed,
                          "max_new_tokens": max_new_tokens, "batch_size": batch_size, "resume": resume},
               "versions": _versions()}
    for name in names:
        # 1. generate/score/judge one task; 2. write the run's files so far (atomic)
        metrics, thr, samples = run_task(get_task(name), generator, out / name, limit=limit, seed=seed,
                                         style=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         resume=resume, judge=judge_obj)
        results["metrics"][name], results["throughput"][name], results["samples"][name] = metrics, thr, samples
        write_reports(out, results)
    logger.info("eval done: %s", summary_line(results))
    return results


def summary_line(results: dict) -> str:
    from alignkit.eval.report import HEADLINE

    parts = []
    for name, m in results["metrics"].items():
        key = HEADLINE.get(name, ("n", True))[0]
        parts.append(f"{name} {key}={m[key]:.4f}" if isinstance(m.get(key), float) else f"{name} n={m.get('n')}")
    return "; ".join(parts)
