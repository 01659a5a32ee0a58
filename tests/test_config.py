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
    with pytest.raises(RecipeError, match=r"unknown key 'nope'.*Valid keys: dpo, eval, grpo, kto, ppo, reward, sft"):
        load_recipe(write(tmp_path, "stage: nope\n"))
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


# ---------------------------------------------------------------------------------------------- YAML 1.2
def test_overrides_and_files_keep_yaml_1_2_meaning(tmp_path):
    from alignkit.config import parse_override, yaml12_load

    # YAML 1.1 (PyYAML's default) reads these as booleans / sexagesimal / octal; YAML 1.2 does not
    table = {"no": "no", "yes": "yes", "on": "on", "off": "off", "true": True, "False": False, "1:30": "1:30",
             "010": 10, "0o17": 15, "0x1f": 31, "1e-6": 1e-6, "2024-01-01": "2024-01-01", "null": None}
    for text, expected in table.items():
        assert yaml12_load(text) == expected and type(yaml12_load(text)) is type(expected), text
    assert parse_override("train.save_strategy=no") == (["train", "save_strategy"], "no")
    st = load_recipe(write(tmp_path, SFT), ["train.save_strategy=no", "lora.enabled=yes"]).stages["sft"]
    assert st.train.save_strategy.value == "no"  # the string "no", not False
    assert st.lora.enabled is True  # bool fields still take yes/no/on/off through coerce
    unquoted = load_recipe(write(tmp_path, SFT.replace("max_steps: 3", "max_steps: 3, save_strategy: no"),
                                 "u.yaml")).stages["sft"]
    assert unquoted.train.save_strategy.value == "no"


# ---------------------------------------------------------------------------------------------- strictness
DPO = SFT.replace("stage: sft", "stage: dpo")


def test_user_keys_are_what_the_user_wrote(tmp_path):
    st = load_recipe(write(tmp_path, SFT), ["lora.r=16", "train.seed=3"]).stages["sft"]
    # forced by the loader (output_dir, use_cpu, bf16) are not the user's; a value equal to the default is
    assert st.user_keys == {"model.name_or_path", "data.path", "train.learning_rate", "train.max_steps",
                            "lora.r", "train.seed"}


def test_label_smoothing_under_dpo_refused(tmp_path):
    pattern = (r"train\.label_smoothing.* is read by losses cdpo, robust, simpo and trl \(loss_type robust, "
               r"exo_pair, aot, aot_unpaired\); this recipe's loss is dpo")
    for value in ("0.1", "0.0"):  # a value equal to TRL's default is still a key the user set
        with pytest.raises(RecipeError, match=pattern) as err:
            load_recipe(write(tmp_path, DPO), [f"train.label_smoothing={value}"])
        assert "\n" not in str(err.value) and "r.yaml" in str(err.value)
    for loss in ("cdpo", "robust", "simpo"):  # read there
        st = load_recipe(write(tmp_path, DPO), [f"train.loss={loss}", "train.label_smoothing=0.1"]).stages["dpo"]
        assert st.train.label_smoothing == 0.1
    with pytest.raises(RecipeError, match=r"train\.simpo_gamma.* is read by loss simpo; this recipe's loss is ipo"):
        load_recipe(write(tmp_path, DPO), ["train.loss=ipo", "train.simpo_gamma=0.5"])


@pytest.mark.parametrize("override", ["train.use_weighting=true", "train.ld_alpha=0.5",
                                      "train.f_divergence_type=js_divergence", "train.loss_weights=[1.0]",
                                      "train.f_alpha_divergence_coef=0.5", "train.discopop_tau=0.05"])
def test_trl_only_loss_knobs_under_an_alignkit_loss_refused(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=rf"{key}.* is read by loss trl.*this recipe's loss is dpo"):
        load_recipe(write(tmp_path, DPO), ["train.loss=dpo", override])


def test_trl_loss_type_honoured_mapped_or_refused(tmp_path):
    def loss_of(*ov):
        return load_recipe(write(tmp_path, DPO), list(ov)).stages["dpo"].train.loss

    # TRL users' loss_type: mapped onto the same alignkit loss, or run by TRL itself
    assert loss_of() == "dpo"
    assert loss_of("train.loss_type=ipo") == "ipo"
    assert loss_of("train.loss_type=hinge") == "hinge"
    assert loss_of("train.loss_type=exo_pair") == "trl"
    assert loss_of("train.loss_type=[sigmoid,sft]", "train.loss_weights=[1.0,0.5]") == "trl"
    assert loss_of("train.use_weighting=true") == "trl"  # a TRL-only knob in use: TRL's loss runs
    assert loss_of("train.loss=ipo", "train.loss_type=ipo") == "ipo"  # agreeing pair
    assert loss_of("train.loss=trl", "train.loss_type=hinge", "train.f_divergence_type=forward_kl") == "trl"
    with pytest.raises(RecipeError, match=r"loss='ipo' and loss_type=\['hinge'\] name different losses"):
        loss_of("train.loss=ipo", "train.loss_type=hinge")
    with pytest.raises(RecipeError, match=r"train\.loss_type is read by loss trl; this recipe's loss is ipo"):
        loss_of("train.loss=ipo", "train.loss_type=sigmoid")  # TRL's default value, but written by the user
    with pytest.raises(RecipeError, match=r"train\.label_smoothing.*this recipe's loss is trl with loss_type hinge"):
        loss_of("train.loss=trl", "train.loss_type=hinge", "train.label_smoothing=0.1")


def test_reference_settings_under_reference_free_loss_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"precompute_ref_log_probs.* reference-free"):
        load_recipe(write(tmp_path, DPO), ["train.loss=simpo", "train.precompute_ref_log_probs=false"])


def test_generic_rules_lora_and_data(tmp_path):
    with pytest.raises(RecipeError, match=r"lora\.r is read only with lora\.enabled: true.*remove it"):
        load_recipe(write(tmp_path, SFT), ["lora.r=8"])
    assert load_recipe(write(tmp_path, SFT), ["lora.r=8", "lora.enabled=true"]).stages["sft"].lora.r == 8
    with pytest.raises(RecipeError, match=r"data\.format is read by stages dpo, reward, kto; this recipe's stage is sft"):
        load_recipe(write(tmp_path, SFT), ["data.format=auto"])
    with pytest.raises(RecipeError, match=r"data\.packing is read by stages sft; this recipe's stage is dpo"):
        load_recipe(write(tmp_path, DPO), ["data.packing=alignkit"])
    with pytest.raises(RecipeError, match=r"data\.format.*\(also ignored: lora\.r\)"):
        load_recipe(write(tmp_path, SFT), ["data.format=hh", "lora.r=4"])
    # strict=False skips the check (tools that inspect a recipe as it is)
    assert load_recipe(write(tmp_path, SFT), ["data.format=hh"], strict=False).stages["sft"].data.format == "hh"


def test_chain_strictness(tmp_path):
    chain = """
        stages: [sft, dpo]
        model: {name_or_path: base, revision: main}
        data: {format: hh, packing: alignkit, template: alpaca_sft}
        sft: {data: {path: a.jsonl}}
        dpo: {data: {path: b.jsonl}}
    """
    recipe = load_recipe(write(tmp_path, chain))  # shared keys: each is read by some stage
    assert recipe.stages["dpo"].previous == "sft" and recipe.stages["sft"].previous is None
    with pytest.raises(RecipeError, match=r"dpo: model\.name_or_path is read by the chain's first training "
                                          r"stage; dpo starts from the model sft trained"):
        load_recipe(write(tmp_path, chain), ["dpo.model.name_or_path=other"])
    with pytest.raises(RecipeError, match=r"sft: data\.format is read by stages dpo, reward"):
        load_recipe(write(tmp_path, chain), ["sft.data.format=hh"])
    with pytest.raises(RecipeError, match=r"data\.packing \(top level\) is read by no stage of this chain"):
        load_recipe(write(tmp_path, chain.replace("[sft, dpo]", "[dpo, reward]").replace("sft:", "reward:")))


def test_resolved_config_leaves_out_what_the_stage_ignores(tmp_path):
    st = load_recipe(write(tmp_path, DPO), ["train.loss=ipo"]).stages["dpo"]
    doc = st.to_dict()
    assert doc["train"]["loss"] == "ipo" and doc["train"]["beta"] == 0.1
    assert not {"label_smoothing", "simpo_gamma", "use_weighting", "loss_type"} & set(doc["train"])
    assert "packing" not in doc["data"] and doc["data"]["format"] == "auto"


def test_interval_knobs_need_their_strategy(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.eval_steps is read with train\.eval_strategy: steps; this "
                                          r"recipe's eval_strategy is no"):
        load_recipe(write(tmp_path, SFT), ["train.eval_steps=10"])
    with pytest.raises(RecipeError, match=r"train\.save_steps is read with train\.save_strategy: steps; this "
                                          r"recipe's save_strategy is epoch"):
        load_recipe(write(tmp_path, SFT), ["train.save_strategy=epoch", "train.save_steps=10"])
    with pytest.raises(RecipeError, match=r"train\.save_total_limit is read when checkpoints are saved"):
        load_recipe(write(tmp_path, SFT), ["train.save_strategy=no", "train.save_total_limit=2"])
    st = load_recipe(write(tmp_path, SFT), ["train.eval_strategy=steps", "train.eval_steps=10"]).stages["sft"]
    assert st.train.eval_steps == 10
