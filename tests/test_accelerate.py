"""The shipped accelerate configs: parsed by accelerate, sharding configs checked against the model and DeepSpeed's
own config classes, a sharded launch without CUDA refused, and two DDP processes on CPU (gloo) that end with equal
weights and the single-process run's losses.

`accelerate launch` cannot shard here: on a machine without a CUDA GPU accelerate turns an FSDP config into plain
CPU data parallelism (MULTI_CPU) and DeepSpeed needs an accelerator, so those launches are refused by
alignkit.config.check_launch rather than quietly run unsharded, and the DeepSpeed configs are validated by
DeepSpeed's own config classes. The sharding fsdp.yaml selects (FSDP2, reshard after forward, accelerate's wrap
policy from the model) does run on CPU: two gloo processes with torch's ``fully_shard``, parameters split across
the ranks, the same losses and weights as one process."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from alignkit.config import RecipeError, check_launch
from alignkit.data.io import read_jsonl

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
    from alignkit.cli.train import main
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
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # the wrap class comes from the model
    for path in CONFIGS:  # accelerate's own parser (what `accelerate launch --config_file` reads)
        assert load_config_from_file(str(path)).distributed_type.value == yaml.safe_load(path.read_text())[
            "distributed_type"]


def test_fsdp_wrap_class_comes_from_the_model(tiny_model):
    """fsdp.yaml names no layer class: accelerate wraps the model's ``_no_split_modules`` (LlamaDecoderLayer)."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    cfg = yaml.safe_load((ROOT / "accelerate_configs/fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=cfg["fsdp_version"],
                                            auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
                                            transformer_cls_names_to_wrap=cfg.get("fsdp_transformer_layer_cls_to_wrap"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, tiny_model)
    wrapped = [name for name, module in tiny_model.named_modules() if policy(module)]
    layers = [f"model.layers.{i}" for i in range(tiny_model.config.num_hidden_layers)]
    assert set(tiny_model._no_split_modules) == {"LlamaDecoderLayer"} and wrapped == layers


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_pass_deepspeeds_own_config_class(name, stage):
    """The ZeRO section accelerate builds from the yaml is valid for DeepSpeed (``pip install deepspeed``)."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    zero_config = pytest.importorskip("deepspeed.runtime.zero.config", reason="needs the deepspeed extra")
    cfg = yaml.safe_load((ROOT / "accelerate_configs" / f"{name}.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(**{k.removeprefix("deepspeed_"): v for k, v in cfg.items()})
    zero = zero_config.DeepSpeedZeroConfig(**plugin.deepspeed_config["zero_optimization"])
    assert zero.stage == stage == cfg["zero_stage"]
    with pytest.raises(ValueError):  # the class really validates: a ZeRO stage that does not exist
        zero_config.DeepSpeedZeroConfig(**{**plugin.deepspeed_config["zero_optimization"], "stage": 7})


def test_sharded_launch_without_cuda_is_refused():
    check_launch({}, cuda=False)
    check_launch({"ACCELERATE_USE_FSDP": "true"}, cuda=True)
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        with pytest.raises(RecipeError, match=rf"{var}=true\) on a machine without a CUDA GPU: accelerate would run "
                                              "plain DDP"):
            check_launch({var: "true"}, cuda=False)


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
    # one process with the global batch (2 ranks x 2) sees the same rows each step: the same losses
    single = subprocess.run([sys.executable, "-m", "alignkit", "train", str(recipe), f"output_dir={tmp_path / 'one'}",
                             "train.per_device_train_batch_size=4"], check=False, env=env, capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(out):
        return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]

    ddp, one = losses(tmp_path / "out"), losses(tmp_path / "one")
    assert len(ddp) == len(one) == 2 and ddp == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_fsdp_launch_on_cpu_stops_before_loading(tmp_path, tiny_model_dir):
    """`accelerate launch --config_file accelerate_configs/fsdp.yaml` here would train unsharded: refused (exit 2)."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"stage: sft\nmodel: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {tmp_path / 'd.jsonl'}}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29534", "-m", "alignkit", "train",
           str(recipe)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "(ACCELERATE_USE_FSDP=true) on a machine without a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr.split("ACCELERATE_USE_FSDP=true")[0]


# FSDP2 as fsdp.yaml configures it (version 2, reshard_after_forward, accelerate's transformer wrap policy from the
# model's _no_split_modules), applied with torch's fully_shard on CPU (gloo): accelerate itself only enables FSDP
# on GPU-family devices, so this runs the sharding the config selects, not `accelerate launch`
FSDP2_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist, yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    out, model_dir, config, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    full_numel = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if world > 1:
        cfg = yaml.safe_load(open(config))["fsdp_config"]
        plugin = FullyShardedDataParallelPlugin(fsdp_version=cfg["fsdp_version"],
                                                auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
                                                transformer_cls_names_to_wrap=None)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        units = [name for name, m in model.named_modules() if policy(m)]
        for name, m in model.named_modules():
            if policy(m):
                fully_shard(m, reshard_after_forward=cfg["fsdp_reshard_after_forward"])
        fully_shard(model, reshard_after_forward=cfg["fsdp_reshard_after_forward"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)  # the global batch, equal lengths
    mine = batch.chunk(world)[rank]
    losses = []
    for step in range(2):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    local = {n: p.to_local().numel() if hasattr(p, "to_local") else p.numel() for n, p in model.named_parameters()}
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"state": state, "losses": losses, "local": local, "full": full_numel,
                    "units": units if world > 1 else []}, os.path.join(out, f"world{world}.pt"))
    if world > 1:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_fsdp2_config_shards_and_matches_one_process(tmp_path, tiny_model_dir):
    import torch

    worker = tmp_path / "fsdp2_worker.py"
    worker.write_text(FSDP2_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = str(ROOT / "accelerate_configs/fsdp.yaml")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29541", str(worker), str(tmp_path), str(tiny_model_dir), config, "2"],
                         check=False, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(worker), str(tmp_path), str(tiny_model_dir), config, "1"],
                         check=False, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded, single = torch.load(tmp_path / "world2.pt"), torch.load(tmp_path / "world1.pt")
    # 1. wrapped per decoder layer, and every parameter really split across the two ranks: rank 0 holds the
    #    first ceil(d0 / 2) rows of dim 0 (an odd vocabulary splits unevenly)
    assert sharded["units"] == [f"model.layers.{i}" for i in range(2)]
    for name, shape in sharded["full"].items():
        assert sharded["local"][name] == math.ceil(shape[0] / 2) * math.prod(shape[1:]), name
    # 2. the same losses and the same trained weights as one process with the whole batch (AdamW at lr 1e-2
    #    turns reduction-order noise on near-zero gradients into ~2e-5 on a few weights: 1e-4 is 1% of a step)
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert sharded["losses"][1] < sharded["losses"][0]  # it trained
    for name, value in single["state"].items():
        torch.testing.assert_close(sharded["state"][name], value, atol=1e-4, rtol=1e-4)
