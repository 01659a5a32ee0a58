"""report_to: mlflow, offline: a real sft -> eval chain logs into <output_dir>/mlruns, read back with MLflow's
own client (an independent reader): params, per-step losses equal to metrics.jsonl, the config artifact, the
eval scores; a rerun logs into the same run; a missing mlflow package stops before any model loads."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from alignkit import pipeline
from alignkit.config import load_recipe
from alignkit.train import tracking
from alignkit.train.callbacks import read_metrics

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _chain(tmp_path, model_dir, report_to="mlflow"):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."})
                            + "\n" for i in range(8)))
    path = tmp_path / "chain.yaml"
    path.write_text(f"stages: [sft, eval]\nmodel: {{name_or_path: {model_dir}, dtype: float32}}\n"
                    f"sft:\n  data: {{path: {data}, template: alpaca_sft}}\n"
                    f"  train: {{max_steps: 3, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                    f"report_to: {report_to}, gradient_checkpointing: false, save_strategy: 'no', "
                    "learning_rate: 1.0e-3}\n"
                    "eval: {tasks: [gsm8k], limit: 2, max_new_tokens: 4}\n")
    return load_recipe(path, [f"output_dir={tmp_path / 'tracked'}"])


def test_chain_logs_stage_and_eval_runs_offline(tmp_path, tiny_model_dir, clean_mlflow_env):
    recipe = _chain(tmp_path, tiny_model_dir)
    assert pipeline.run_recipe(recipe) == 0
    out = tmp_path / "tracked"
    assert (out / "mlruns").is_dir()
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"sft", "eval"}
    sft_run = runs["sft"]
    # 1. the stage's TrainingArguments as params, every logged loss as the metric history of that step
    assert float(sft_run.data.params["learning_rate"]) == pytest.approx(1e-3)
    jsonl = {r["step"]: r["loss"] for r in read_metrics(recipe.stage_dir("sft") / "metrics.jsonl") if "loss" in r}
    history = {m.step: m.value for m in client.get_metric_history(sft_run.info.run_id, "loss")}
    assert history == pytest.approx(jsonl) and sorted(history) == [1, 2, 3]
    # 2. the resolved config as an artifact, identical to the stage folder's file
    assert "resolved_config.yaml" in {a.path for a in client.list_artifacts(sft_run.info.run_id)}
    copy = client.download_artifacts(sft_run.info.run_id, "resolved_config.yaml", str(tmp_path / "dl"))
    assert Path(copy).read_text() == (recipe.stage_dir("sft") / "resolved_config.yaml").read_text()
    # 3. the eval scores: every number of the before/after columns, named <column>/<metric>
    state = json.loads((recipe.stage_dir("eval") / "state.json").read_text())
    columns = state["result"]["metrics"]
    expected = {f"{col}/{k}": v for col, m in columns.items() for k, v in tracking.numeric(m).items()}
    assert expected and runs["eval"].data.metrics == pytest.approx(expected)
    assert runs["eval"].data.metrics["after/gsm8k/n"] == 2.0 and "before/gsm8k/accuracy" in runs["eval"].data.metrics


def test_rerun_logs_into_the_recorded_run(tmp_path, clean_mlflow_env):
    stage_dir = tmp_path / "run" / "1_sft"
    stage_dir.mkdir(parents=True)
    args = type("Args", (), {"report_to": ["tensorboard", "mlflow"]})()
    ids = []
    for value in (1.0, 2.0):
        with tracking.stage_run("sft", args, tmp_path / "run", stage_dir) as ml:
            ml.log_metric("x", value, step=int(value))
            ids.append(ml.active_run().info.run_id)
    assert ids[0] == ids[1]
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    assert [m.value for m in client.get_metric_history(ids[0], "x")] == [1.0, 2.0]


def test_no_mlflow_run_without_report_to(tmp_path, clean_mlflow_env):
    args = type("Args", (), {"report_to": "tensorboard"})()
    with tracking.stage_run("sft", args, tmp_path, tmp_path) as ml:
        assert ml is None
    assert not (tmp_path / "mlruns").exists()


def test_missing_package_is_one_line(tmp_path, monkeypatch, clean_mlflow_env):
    real_import = builtins.__import__

    def no_mlflow(name, *a, **kw):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    args = type("Args", (), {"report_to": "mlflow"})()
    with (pytest.raises(ValueError, match=r"sft: train.report_to: mlflow needs the mlflow package"),
          tracking.stage_run("sft", args, tmp_path, tmp_path)):
        pass
