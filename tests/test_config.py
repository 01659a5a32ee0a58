"""Recipes: YAML + dotted overrides -> typed configs; error messages for bad recipes."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from alignkit.config import (
    DataArgs,
    LoraArgs,
    RecipeError,
    coerce,
    load_recipe,
    save_resolved_config,
)


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


SFT = """
stage: sft
model: {name_or_path: /some/model}
data: {path: data.jsonl}
train: {learning_rate: 2.0e-5, max_steps: 3}
"""


def test_single_stage_typed_and_overridden(tmp_path):
    path = write(tmp_path, SFT)
    recipe = load_recipe(path, ["train.learning_rate=1e-6", "lora.r=32", "lora.enabled=true",
                                "lora.target_modules=[q_proj,v_proj]", "data.columns={prompt: q, completion: a}",
                                "output_dir=" + str(tmp_path / "out")])
    st = recipe.stages["sft"]
    # "1e-6" is a YAML string; the float field type converts it
    assert st.train.learning_rate == pytest.approx(1e-6) and isinstance(st.train.learning_rate, float)
    assert st.lora.r == 32 and st.lora.enabled is True
    assert st.lora.target_modules == ["q_proj", "v_proj"]
    assert st.data.columns == {"prompt": "q", "completion": "a"}
    assert st.train.max_steps == 3
    assert st.train.output_dir == str(tmp_path / "out")  # single stage writes into output_dir
    assert recipe.stage == "sft" and recipe.data.path == "data.jsonl"  # what `alignkit data check` reads


def test_hardware_defaults_on_cpu(tmp_path):
    import torch

    st = load_recipe(write(tmp_path, SFT)).stages["sft"]
    if not torch.cuda.is_available():
        assert st.train.use_cpu is True and st.train.bf16 is False
    st2 = load_recipe(write(tmp_path, SFT), ["train.use_cpu=false"]).stages["sft"]
    assert st2.train.use_cpu is False  # an explicit user value is kept


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, SFT), ["train.learnig_rate=1e-5"])
    msg = str(err.value)
    assert "r.yaml" in msg and "'learnig_rate'" in msg and "did you mean 'learning_rate'" in msg
    assert "per_device_train_batch_size" in msg  # the valid keys are listed
    with pytest.raises(RecipeError, match=r"lora: unknown key 'rank'.*Valid keys: alpha, bias, dropout"):
        load_recipe(write(tmp_path, SFT), ["lora.rank=8"])
    with pytest.raises(RecipeError, match=r"top level: unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, SFT + "trian: {}\n"))


def test_wrong_types_named(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.learning_rate: expected float, got 'fast'"):
        load_recipe(write(tmp_path, SFT), ["train.learning_rate=fast"])
    with pytest.raises(RecipeError, match=r"lora\.r: expected int, got 2\.5"):
        load_recipe(write(tmp_path, SFT), ["lora.r=2.5"])
    with pytest.raises(RecipeError, match=r"lora\.enabled: expected bool"):
        load_recipe(write(tmp_path, SFT), ["lora.enabled=maybe"])
    with pytest.raises(RecipeError, match=r"optim: 'rmsprob' is not a valid OptimizerNames \(did you mean 'rmsprop'"):
        load_recipe(write(tmp_path, SFT), ["train.optim=rmsprob"])
    with pytest.raises(RecipeError, match=r"model\.quantization: '3bit' is not one of"):
        load_recipe(write(tmp_path, SFT), ["model.quantization=3bit"])


def test_dpo_loss_choice_validated(tmp_path):
    text = SFT.replace("stage: sft", "stage: dpo")
    assert load_recipe(write(tmp_path, text), ["train.loss=ipo"]).stages["dpo"].train.loss == "ipo"
    with pytest.raises(RecipeError, match=r"train\.loss: 'dop' is not one of"):
        load_recipe(write(tmp_path, text), ["train.loss=dop"])


def test_chain_sections_merge_over_shared_defaults(tmp_path):
    path = write(tmp_path, """
        stages: [sft, dpo, eval]
        output_dir: OUT
        model: {name_or_path: base}
        lora: {enabled: true, r: 8}
        sft: {data: {path: a.jsonl}, train: {max_steps: 2}}
        dpo: {data: {path: b.jsonl}, lora: {r: 4}, train: {beta: 0.2}}
        eval: {tasks: [gsm8k], limit: 4, checks: {gsm8k/accuracy: rise}}
    """)
    recipe = load_recipe(path, ["dpo.train.learning_rate=1e-6"])
    assert recipe.steps == ["sft", "dpo", "eval"]
    assert recipe.stages["sft"].lora.r == 8 and recipe.stages["dpo"].lora.r == 4
    assert recipe.stages["dpo"].lora.enabled is True  # deep merge keeps the shared key
    assert recipe.stages["dpo"].train.beta == 0.2 and recipe.stages["dpo"].train.learning_rate == 1e-6
    assert recipe.stages["dpo"].train.output_dir.endswith("OUT/2_dpo")
    assert recipe.eval.tasks == ["gsm8k"] and recipe.eval.limit == 4
    with pytest.raises(RecipeError, match=r"dpo: unknown key 'trian'"):
        load_recipe(path, ["dpo.trian.beta=1"])


def test_missing_or_conflicting_stage(tmp_path):
    with pytest.raises(RecipeError, match="missing 'stage'"):
        load_recipe(write(tmp_path, "model: {}\n"))
    with pytest.raises(RecipeError, match=r"unknown key 'ppo'.*Valid keys: dpo, eval, grpo, reward, sft"):
        load_recipe(write(tmp_path, "stage: ppo\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(write(tmp_path, SFT), ["train.learning_rate"])


def test_trl_post_init_errors_are_recipe_errors(tmp_path):
    # load_best_model_at_end needs matching eval/save strategies: TRL/transformers' own check, reported with the file
    with pytest.raises(RecipeError, match=r"r\.yaml: train: .*load_best_model_at_end"):
        load_recipe(write(tmp_path, SFT), ["train.load_best_model_at_end=true", "train.eval_strategy=steps",
                                           "train.save_strategy=epoch"])


def test_coerce_table():
    assert coerce("3", int | None, "x") == 3
    assert coerce(None, int | None, "x") is None
    assert coerce("1e3", int, "x") == 1000
    assert coerce("a,b", list[str], "x") == ["a", "b"]
    assert coerce("all-linear", list[str] | str, "x") == "all-linear"
    assert coerce(["q", "v"], list[str] | str, "x") == ["q", "v"]
    assert coerce("yes", bool, "x") is True and coerce(0, bool, "x") is False
    with pytest.raises(RecipeError):
        coerce([1], float, "x")


def test_every_section_field_has_help():
    import dataclasses

    from alignkit.config import EvalArgs, ModelArgs
    from alignkit.train.dpo import DPOArgs

    for cls in (ModelArgs, DataArgs, LoraArgs, EvalArgs, DPOArgs):
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        assert not missing, f"{cls.__name__} fields without help: {missing}"


def test_resolved_config_roundtrip(tmp_path):
    st = load_recipe(write(tmp_path, SFT), ["train.learning_rate=3e-4"]).stages["sft"]
    out = tmp_path / "resolved_config.yaml"
    save_resolved_config(st, out, {"kind": "folder", "path": "/m"}, recipe_path="r.yaml")
    doc = yaml.safe_load(out.read_text())
    assert doc["train"]["learning_rate"] == 3e-4 and doc["model_source"] == {"kind": "folder", "path": "/m"}
    assert doc["lora"]["r"] == LoraArgs().r and doc["stage"] == "sft"
    # the resolved config is itself a valid recipe after dropping the bookkeeping keys
    again = {k: doc[k] for k in ("stage", "model", "data", "lora")}
    again["train"] = {"learning_rate": doc["train"]["learning_rate"]}
    path2 = tmp_path / "again.yaml"
    path2.write_text(yaml.safe_dump(again))
    assert load_recipe(path2).stages["sft"].train.learning_rate == 3e-4
