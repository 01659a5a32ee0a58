"""Two processes under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU): ranks end equal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))

# runs `alignkit train` in each rank and dumps that rank's trained weights
WORKER = textwrap.dedent("""
    import os, sys, torch
    from alignkit.train import common
    original = common.train_and_save

    def recording(trainer, recipe, stage_dir, tokenizer, source, **kw):
        result = original(trainer, recipe, stage_dir, tokenizer, source, **kw)
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "world": trainer.accelerator.num_processes,
                    "step": trainer.state.global_step}, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
        return result

    common.train_and_save = recording
    from alignkit.pipeline import main
    raise SystemExit(main(sys.argv[2:]))
""")


def test_accelerate_configs_parse_and_explain_themselves():
    import yaml

    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"} <= names
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
        assert path.read_text().lstrip().startswith("#"), f"{path.name}: say when to use it"
    fsdp = yaml.safe_load((ROOT / "accelerate_configs/fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


@pytest.mark.slow
def test_two_gloo_processes_end_with_equal_weights(tmp_path, tiny_model_dir):
    import torch

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "completion": f"It is {2 * i}."}) + "\n"
                            for i in range(16)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"stage: sft\nmodel: {{name_or_path: {tiny_model_dir}}}\n"
                      f"data: {{path: {data}, template: alpaca_sft}}\noutput_dir: {tmp_path / 'out'}\n"
                      "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                      "report_to: none, gradient_checkpointing: false, save_strategy: 'no', learning_rate: 1.0e-2}\n")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(worker), str(tmp_path), str(recipe)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [2, 2]
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = 0
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # DDP kept the replicas identical
        moved += not torch.allclose(value, fresh[key])
    assert moved > 0  # and they trained
    # rank 0 alone wrote the outputs
    assert (tmp_path / "out" / "DONE").exists() and (tmp_path / "out" / "final").is_dir()
    assert len([line for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]) >= 2
