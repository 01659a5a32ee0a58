"""Experiment tracking with ``report_to: mlflow``, offline: one MLflow run per step of a chain.

``alignkit train RECIPE`` with ``train.report_to: mlflow`` (or a list naming it) on a stage:

* tracking URI ``$MLFLOW_TRACKING_URI`` when set (a server, ``sqlite:///...``), else a local
  ``<output_dir>/mlruns/`` folder (MLflow's file store, which MLflow 3 keeps behind
  ``MLFLOW_ALLOW_FILE_STORE=true``: set here for that folder only when the variable is unset); experiment
  ``$MLFLOW_EXPERIMENT_NAME`` or the output folder's name;
* each training stage is one run named after the step, opened before the stage starts, so transformers'
  ``MLflowCallback`` logs the stage's TrainingArguments and every logged metric (loss, rewards,
  ``train.task_eval`` rates) into it; alignkit adds the resolved config (``resolved_config.yaml``) and the
  curves PNG as artifacts. The run id is kept in ``<stage_dir>/mlflow_run.json``: a resumed stage logs
  into the same run;
* the ``eval`` step is a run named ``eval`` with every score as ``<column>/<metric>`` (``before/...``,
  ``after/...``) and the before/after table and eval config as artifacts.

Only the main process talks to MLflow. Without the ``mlflow`` package (``pip install 'alignkit[tracking]'``
gives ``mlflow-skinny``) a recipe that asks for it stops before any model loads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path

from alignkit.data.io import write_json_atomic

logger = logging.getLogger("alignkit.train")
RUN_FILE = "mlflow_run.json"


def wants_mlflow(report_to) -> bool:
    """Whether a ``report_to`` value (str, list or None) asks for MLflow (``all`` does when it is installed)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "mlflow" in names


def _mlflow(key: str):
    try:
        import mlflow
    except ImportError:
        raise ValueError(f"{key}: mlflow needs the mlflow package: pip install 'alignkit[tracking]' "
                         "(or mlflow-skinny)") from None
    return mlflow


def configure(mlflow, output_dir: Path) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or ``<output_dir>/mlruns``; returns the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (Path(output_dir) / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or Path(output_dir).resolve().name)
    return uri


@contextlib.contextmanager
def mlflow_run(name: str, output_dir: Path, stage_dir: Path, *, key: str):
    """An active MLflow run for one step (resumed from ``stage_dir/mlflow_run.json``); yields the module."""
    mlflow = _mlflow(key)
    uri = configure(mlflow, output_dir)
    record = Path(stage_dir) / RUN_FILE
    run_id = json.loads(record.read_text())["run_id"] if record.exists() else None
    with mlflow.start_run(run_id=run_id, run_name=name) as run:
        write_json_atomic(record, {"run_id": run.info.run_id, "tracking_uri": uri})
        logger.info("mlflow: step %s logs to run %s (%s)%s", name, run.info.run_id, uri,
                    " (resumed)" if run_id else "")
        yield mlflow


@contextlib.contextmanager
def stage_run(step: str, train_args, output_dir: Path, stage_dir: Path, *, main_process: bool = True):
    """Around one training stage: an MLflow run when its ``report_to`` names mlflow, else nothing."""
    if not (main_process and wants_mlflow(getattr(train_args, "report_to", None))):
        yield None
        return
    with mlflow_run(step, output_dir, stage_dir, key=f"{step}: train.report_to") as mlflow:
        yield mlflow
        for artifact in ("resolved_config.yaml", "curves.png"):
            if (Path(stage_dir) / artifact).exists():
                mlflow.log_artifact(str(Path(stage_dir) / artifact))


def numeric(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``metrics`` (nested dicts flattened with ``/``), keyed ``prefix + name``."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[re.sub(r"[^0-9A-Za-z_\-. :/]", "_", f"{prefix}{key}")] = float(value)  # MLflow's name rule
    return out


def log_eval(columns: dict[str, dict], output_dir: Path, stage_dir: Path) -> None:
    """The eval step's scores as one MLflow run named ``eval`` (``<column>/<metric>``) + its files."""
    with mlflow_run("eval", output_dir, stage_dir, key="eval: a stage's train.report_to") as mlflow:
        for column, metrics in columns.items():
            mlflow.log_metrics(numeric(metrics, f"{column}/"))
        for artifact in ("before_after.md", "resolved_config.yaml"):
            if (Path(stage_dir) / artifact).exists():
                mlflow.log_artifact(str(Path(stage_dir) / artifact))
