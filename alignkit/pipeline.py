"""Stage chains: run one stage or a chain of stages (what ``alignkit train RECIPE.yaml`` runs).

Each step's directory gets ``resolved_config.yaml`` (with the ModelSource actually loaded) and, once
finished, ``state.json`` + ``DONE`` written atomically. Rerunning the same command skips finished steps
and continues the first unfinished one from its newest complete checkpoint (docs/resume.md); a step
recorded with another config refuses with the diff unless ``--restart`` (old folder kept as ``.prev``). The ``eval`` step scores the starting model (before) and the chain's final model
(after) with :func:`alignkit.eval.runner.run_eval_config` (and the quickstart metrics when asked), prints a
before/after table and checks the recipe's claims (exit code 1 when one fails).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from alignkit.config import EvalArgs, Recipe, resolved_config_doc, save_resolved_config
from alignkit.data.io import write_text_atomic
from alignkit.eval.runner import run_eval_config
from alignkit.models import DEFAULT_MODEL
from alignkit.train import get_stage_module, tracking
from alignkit.train.common import resume_checkpoint
from alignkit.train.quickstart import evaluate, materialize_data

logger = logging.getLogger("alignkit.pipeline")
EXIT_INTERRUPTED = 130


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/torchrun (RANK unset: a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def read_state(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def mark_done(stage_dir: Path, result: dict) -> None:
    """``state.json`` then ``DONE``, each atomic (main process only)."""
    if not is_main_process():
        return
    write_text_atomic(Path(stage_dir) / "state.json",
                 json.dumps({"status": "done", "finished": time.time(), "result": result}, indent=2, default=str))
    write_text_atomic(Path(stage_dir) / "DONE", "done\n")


def is_done(stage_dir: Path) -> bool:
    state = read_state(stage_dir)
    return (Path(stage_dir) / "DONE").exists() and state is not None and state.get("status") == "done"


class StageConfigChanged(RuntimeError):
    """A rerun whose resolved config differs from the one recorded in a step's folder (exit code 2)."""


def run_recipe(recipe: Recipe, *, restart: bool = False, command: str | None = None) -> int:
    """Run every step of ``recipe`` in order; returns the process exit code.

    Folders are checked first (:func:`prepare_folders`): a step recorded with another config refuses
    (:class:`StageConfigChanged`) unless ``restart``. ``command`` is what the interrupt message tells
    the user to run to continue (default ``alignkit train RECIPE``)."""
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    prepare_folders(recipe, restart=restart)
    model_path: str | None = None
    results: dict[str, dict] = {}
    for step in recipe.steps:
        # 1. finished steps are skipped (their output model feeds the next step)
        stage_dir = recipe.stage_dir(step)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if is_done(stage_dir):
            result = read_state(stage_dir)["result"]
            logger.info("step %s already done with the same config (%s): skipping (--restart trains it again)",
                        step, stage_dir)
        elif step == "eval":
            if is_main_process():
                write_text_atomic(stage_dir / CONFIG_FILE, yaml.safe_dump(eval_config_doc(recipe), sort_keys=False))
            result = run_eval_step(recipe, model_path, stage_dir)
        else:
            # 2. a training stage: resolve built-in data, save the resolved config, run, record
            result = run_stage(recipe, step, stage_dir, model_path)
            if result.get("interrupted"):
                _report_interrupt(recipe, step, result, command)
                return EXIT_INTERRUPTED
        if not is_done(stage_dir):
            mark_done(stage_dir, result)
        results[step] = result
        if step != "eval":
            model_path = result.get("model_dir")
            if model_path is None and step != recipe.steps[-1]:
                raise RuntimeError(f"step {step} produced no full model folder for the next step (stage "
                                   f"{step} returned model_dir None)")
        if result.get("checks_failed"):
            return 1
    _print_summary(recipe, results)
    return 0


def run_stage(recipe: Recipe, step: str, stage_dir: Path, model_path: str | None) -> dict:
    """One training stage: built-in data written, resolved config saved (before and after), run."""
    stage = recipe.stages[step]
    materialize_data(stage.data, recipe.output_dir / "data", seed=recipe.seed)
    config_path = stage_dir / CONFIG_FILE
    if is_main_process():
        save_resolved_config(stage, config_path, recipe_path=recipe.path)
    logger.info("step %s: %s -> %s", step, model_path or stage.model.name_or_path, stage_dir)
    with tracking.stage_run(step, stage.train, recipe.output_dir, stage_dir, main_process=is_main_process()):
        result = get_stage_module(step).run(stage, stage_dir, model_path)
        if is_main_process():  # (before the MLflow run closes: it keeps this file as an artifact)
            save_resolved_config(stage, config_path, result.get("model_source"), recipe_path=recipe.path)
    return result


def _report_interrupt(recipe: Recipe, step: str, result: dict, command: str | None) -> None:
    if not is_main_process():
        return
    command = command or f"alignkit train {shlex.quote(str(recipe.path))}"
    print(f"alignkit train: {step} interrupted at step {result.get('global_step')}; checkpoint "
          f"{result.get('checkpoint')}\ncontinue with: {command}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# folders: recorded config, restart, resume=false
# ------------------------------------------------------------------------------------------------
CONFIG_FILE = "resolved_config.yaml"
UNCOMPARED = ("recipe", "model_source", "resume")  # where the recipe file lives / what was loaded / resume


def step_config(recipe: Recipe, step: str) -> dict:
    """The config a step would record now (its resolved_config.yaml less :data:`UNCOMPARED`)."""
    if step == "eval":
        doc = eval_config_doc(recipe)
    else:
        probe = copy.deepcopy(recipe.stages[step])
        materialize_data(probe.data, recipe.output_dir / "data", seed=recipe.seed)
        doc = resolved_config_doc(probe, recipe_path=recipe.path)
    return {k: v for k, v in yaml.safe_load(yaml.safe_dump(doc)).items() if k not in UNCOMPARED}


def eval_config_doc(recipe: Recipe) -> dict:
    """The eval step's recorded config: its EvalArgs and the chain's seed."""
    return json.loads(json.dumps({"eval": dataclasses.asdict(recipe.eval), "seed": recipe.seed}, default=str))


def recorded_config(stage_dir: Path) -> dict | None:
    """The config recorded in ``stage_dir`` (None when the step never started there)."""
    path = Path(stage_dir) / CONFIG_FILE
    if not path.exists():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in doc.items() if k not in UNCOMPARED}


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """One line per changed key, dotted: ``train.learning_rate: 0.001 -> 0.0002``."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(config_diff(a, b, f"{name}."))
        elif a != b:
            lines.append(f"{name}: {_show(a)} -> {_show(b)}")
    return lines


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


def prepare_folders(recipe: Recipe, *, restart: bool = False) -> list[str]:
    """Before anything runs: refuse steps recorded with another config, else move aside what starts over.

    Starting over moves a step's folder to ``<folder>.prev`` (an older .prev is replaced), and every
    later step's too (their input changes). A changed step refuses when it is finished or holds a
    checkpoint (:func:`resumable`); one stopped before its first checkpoint has nothing to lose and starts
    over. From which step: the first changed one (the first step with ``restart`` when none changed);
    with ``resume: false``, at the latest the first unfinished step that holds files. Returns the steps
    moved aside."""
    changed, refused = {}, {}
    for step in recipe.steps:
        old = recorded_config(recipe.stage_dir(step))
        diff = config_diff(old, step_config(recipe, step)) if old is not None else []
        if diff:
            changed[step] = diff
            if is_done(recipe.stage_dir(step)) or resumable(recipe.stage_dir(step)):
                refused[step] = diff
    if refused and not restart:
        raise StageConfigChanged(_changed_message(recipe, refused))
    first = next((i for i, s in enumerate(recipe.steps) if s in changed), None)  # nothing to lose there
    if restart and first is None:
        first = 0
    elif not recipe.resume:
        unfinished = next((i for i, s in enumerate(recipe.steps)
                           if not is_done(recipe.stage_dir(s)) and _has_files(recipe.stage_dir(s))), None)
        first = min(i for i in (first, unfinished) if i is not None) if unfinished is not None else first
    moved = [s for s in recipe.steps[first:] if move_aside(recipe.stage_dir(s))] if first is not None else []
    return moved


def _changed_message(recipe: Recipe, changed: dict[str, list[str]]) -> str:
    lines = []
    for step, diff in changed.items():
        where = recipe.stage_dir(step)
        lines.append(f"{where} was run with another config ({len(diff)} key(s) changed, recorded -> now):")
        lines.extend(f"  {line}" for line in diff)
    first = recipe.stage_dir(next(iter(changed)))
    lines.append(f"rerun with --restart to start over (the old folder is kept as {first}.prev), "
                 f"or give a new output_dir")
    return "\n".join(lines)


def resumable(stage_dir: Path) -> bool:
    """A step folder holding something to continue from: a complete TRL checkpoint of its attempt, or
    the GRPO loop's ``checkpoints/`` folder."""
    loop = Path(stage_dir) / "checkpoints"
    return resume_checkpoint(stage_dir) is not None or (loop.is_dir() and any(loop.iterdir()))


def _has_files(path: Path) -> bool:
    return Path(path).is_dir() and any(Path(path).iterdir())


def move_aside(stage_dir: Path) -> bool:
    """Move ``stage_dir`` to ``<stage_dir>.prev`` (replacing an older one); False when there was nothing."""
    stage_dir = Path(stage_dir)
    if not _has_files(stage_dir) or not is_main_process():
        return False
    prev = stage_dir.with_name(stage_dir.name + ".prev")
    if prev.exists():
        shutil.rmtree(prev)
    stage_dir.rename(prev)
    logger.warning("starting %s over: the previous run is kept in %s", stage_dir, prev)
    return True


# ------------------------------------------------------------------------------------------------
# eval step
# ------------------------------------------------------------------------------------------------
def _start_model(recipe: Recipe) -> str:
    first = next(iter(recipe.stages.values()), None)
    if first is not None:
        return first.model.name_or_path
    return (recipe.raw.get("model") or {}).get("name_or_path") or DEFAULT_MODEL


def score(model: str, ev: EvalArgs, out_dir: Path, base: str, seed: int, beta: float | None = None) -> dict:
    """Flat metrics ``{"task/metric": value}`` of one model: the stage's EvalConfig run on ``model``
    (bundled tasks and lm-eval tasks, every setting the CLI has) + the quickstart metrics (``beta``: the
    chain's DPO beta, which scales the implicit reward margin; None without a DPO stage)."""
    metrics: dict[str, float] = {}
    if ev.tasks or ev.harness:
        res = run_eval_config(ev.run_config(model, out_dir, seed))
        for task, values in res.get("metrics", {}).items():
            metrics.update({f"{task}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        for task, values in (res.get("harness") or {}).get("results", {}).items():  # lm-eval: "acc,none"
            metrics.update({f"{task}/{k.removesuffix(',none')}": v for k, v in values.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k})
    if ev.quickstart:
        metrics.update(evaluate(model, base, out_dir, beta=beta, questions=ev.quickstart_questions,
                                pairs=ev.quickstart_pairs, max_new_tokens=ev.quickstart_max_new_tokens,
                                batch_size=ev.batch_size))
    return metrics


def run_eval_step(recipe: Recipe, final_model: str | None, stage_dir: Path) -> dict:
    ev = recipe.eval
    base = _start_model(recipe)
    final = final_model or base
    dpo = recipe.stages.get("dpo")
    beta = dpo.train.beta if dpo is not None else None  # the recipe's own beta, never restated
    columns = {}
    if ev.include_base:
        columns["before"] = score(base, ev, stage_dir / "before", base, recipe.seed, beta)
    columns["after"] = score(final, ev, stage_dir / "after", base, recipe.seed, beta)
    table = before_after_table(columns)
    print(table)
    write_text_atomic(stage_dir / "before_after.md", table + "\n")
    if is_main_process() and any(tracking.wants_mlflow(getattr(s.train, "report_to", None))
                                 for s in recipe.stages.values()):
        tracking.log_eval(columns, recipe.output_dir, stage_dir)
    failures = check_claims(columns, ev.checks)
    for failure in failures:
        logger.error("check failed: %s", failure)
    if ev.checks and not failures:
        logger.info("all %d checks passed: %s", len(ev.checks), ev.checks)
    return {"metrics": columns, "models": {"before": base, "after": final}, "checks": ev.checks,
            "checks_failed": failures}


def before_after_table(columns: dict[str, dict]) -> str:
    """Markdown table: one row per metric, columns before/after/change."""
    names = sorted({k for c in columns.values() for k in c})
    lines = ["| metric | " + " | ".join(columns) + (" | change |" if len(columns) == 2 else " |"),
             "|---" * (len(columns) + 1 + (len(columns) == 2)) + "|"]
    for name in names:
        values = [columns[c].get(name) for c in columns]
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in values]
        if len(values) == 2:
            both = all(isinstance(v, (int, float)) for v in values)
            cells.append(f"{values[1] - values[0]:+.3f}" if both else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_claims(columns: dict[str, dict], checks: dict[str, str]) -> list[str]:
    """``{"metric": "rise"}`` (after > before) or ``{"metric": ">0.6"}`` / ``"<x"`` on the after column."""
    failures = []
    after, before = columns.get("after", {}), columns.get("before", {})
    for metric, rule in checks.items():
        # 1. the metric must exist; 2. apply the rule
        if metric not in after:
            failures.append(f"{metric}: not measured (have: {', '.join(sorted(after))})")
            continue
        value = after[metric]
        if rule == "rise":
            if metric not in before:
                failures.append(f"{metric}: 'rise' needs the before column (eval.include_base)")
            elif not value > before[metric]:
                failures.append(f"{metric} did not rise: before {before[metric]:.3f}, after {value:.3f}")
        elif rule[:1] in "<>":
            bound = float(rule[1:])
            ok = value > bound if rule[0] == ">" else value < bound
            if not ok:
                failures.append(f"{metric} = {value:.3f}, expected {rule}")
        else:
            failures.append(f"{metric}: unknown rule {rule!r} (use 'rise', '>X' or '<X')")
    return failures


def _print_summary(recipe: Recipe, results: dict) -> None:
    lines = [f"alignkit train {recipe.path}: {len(results)} step(s) done -> {recipe.output_dir}"]
    for step, result in results.items():
        if step == "eval":
            lines.append(f"  eval: before/after table in {recipe.stage_dir('eval') / 'before_after.md'}")
            continue
        metrics = result.get("metrics", {})
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and ("loss" in k or "accurac" in k)}
        lines.append(f"  {step}: model {result.get('model_dir')} {shown}")
    if is_main_process():
        print("\n".join(lines))
