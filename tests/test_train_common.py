"""alignkit.train.common: holdout split, load_split's validation sources, templates, LoRA config, varlen
attention switch, the checked loader and its report, the stage callbacks and the last checkpoint."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_llama
from trl import SFTConfig

from alignkit.attention import VARLEN_SDPA
from alignkit.config import DataArgs, LoraArgs, ModelArgs
from alignkit.models import load_model
from alignkit.resources import ROOT as RESOURCES
from alignkit.train import common
from alignkit.train.callbacks import GracefulInterruptCallback, MetricsJsonlCallback


# ------------------------------------------------------------------------------------------------ holdout
def _expected_split(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (train, validation): the first ``n_val`` of a seeded shuffle, each side in file order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    return [i for i in range(n) if i not in val], val


@pytest.mark.parametrize("n, val_size, n_val", [
    (20, 0.25, 5),  # a fraction: 0.25 * 20
    (30, 0.1, 3),  # 0.1 * 30 = 3.0000000000000004 -> 3
    (7, 0.4, 3),  # 2.8 rounds to 3
    (20, 3, 3),  # a count
    (20, 1, 1),  # 1 is a count, not 100 %
    (20, 19, 19),
])
def test_holdout_fraction_or_count_seeded_and_disjoint(n, val_size, n_val):
    rows = [{"id": i} for i in range(n)]
    train, val = common.holdout(rows, val_size, seed=7)
    want_train, want_val = _expected_split(n, n_val, 7)
    assert [r["id"] for r in train] == want_train and [r["id"] for r in val] == want_val
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(r["id"] for r in train + val) == list(range(n))  # disjoint, nothing lost
    assert common.holdout(rows, val_size, seed=7) == (train, val)  # same seed, same split


def test_holdout_seed_changes_the_choice_and_duplicates_split_by_position():
    rows = list(range(40))
    assert common.holdout(rows, 0.5, 1)[1] != common.holdout(rows, 0.5, 2)[1]
    train, val = common.holdout(["same"] * 4, 1, seed=0)
    assert (train, val) == (["same"] * 3, ["same"])  # equal rows are still different rows


def test_holdout_zero_keeps_everything_in_a_new_list():
    rows = [1, 2, 3]
    train, val = common.holdout(rows, 0, seed=0)
    assert (train, val) == ([1, 2, 3], []) and train is not rows


@pytest.mark.parametrize("n, val_size, n_val", [
    (1, 0.5, 0),  # round(0.5) == 0: nothing held out
    (10, 0.01, 0),
    (10, 0.99, 10),  # round(9.9) == 10: no training row left
    (5, 5, 5),
    (5, 8, 8),
    (0, 2, 2),
])
def test_holdout_refuses_an_empty_side(n, val_size, n_val):
    with pytest.raises(ValueError, match=rf"data.val_size={val_size} holds out {n_val} of {n} rows; it must "
                                         r"leave at least one row on each side"):
        common.holdout(list(range(n)), val_size, seed=0)


# ------------------------------------------------------------------------------------------------ load_split
class RecordingLoader:
    """``load_fn`` that returns ``rows[path][:limit]`` and records every call."""

    def __init__(self, rows: dict[str, list]):
        self.rows, self.calls = rows, []

    def __call__(self, path, split, limit, name):
        self.calls.append((path, split, limit, name))
        rows = self.rows[(path, split)]
        return iter(rows[:limit] if limit else rows)  # any iterable will do


def test_load_split_from_eval_path():
    load = RecordingLoader({("t.jsonl", "train"): [1, 2, 3], ("v.jsonl", "train"): [8, 9]})
    data = DataArgs(path="t.jsonl", eval_path="v.jsonl", max_rows=2, max_eval_rows=5)
    assert common.load_split(data, load, seed=0) == ([1, 2], [8, 9])
    assert load.calls == [("t.jsonl", "train", 2, "train"), ("v.jsonl", "train", 5, "eval")]


def test_load_split_from_eval_path_and_its_split():
    load = RecordingLoader({("d", "train"): [1, 2, 3], ("v", "dev"): [7]})
    assert common.load_split(DataArgs(path="d", eval_path="v", eval_split="dev"), load, 0) == ([1, 2, 3], [7])
    assert load.calls[1] == ("v", "dev", None, "eval")


def test_load_split_from_eval_split_of_path():
    load = RecordingLoader({("d", "train"): [1, 2, 3], ("d", "test"): [4, 5, 6]})
    data = DataArgs(path="d", eval_split="test", max_eval_rows=2)
    assert common.load_split(data, load, seed=0) == ([1, 2, 3], [4, 5])
    assert load.calls == [("d", "train", None, "train"), ("d", "test", 2, "eval")]


def test_load_split_holds_out_of_the_capped_training_rows():
    rows = list(range(100, 120))
    load = RecordingLoader({("d", "train"): rows})
    data = DataArgs(path="d", val_size=0.5, max_rows=10, max_eval_rows=3)
    train, val = common.load_split(data, load, seed=5)
    want_train, want_val = _expected_split(10, 5, 5)  # half of the first 10 rows
    assert train == [rows[i] for i in want_train]
    assert val == [rows[i] for i in want_val][:3]  # the first 3 held-out rows, in file order
    assert load.calls == [("d", "train", 10, "train")]  # the validation rows were not read again


def test_load_split_without_validation():
    load = RecordingLoader({("d", "train"): [1, 2]})
    assert common.load_split(DataArgs(path="d"), load, seed=0) == ([1, 2], [])


def test_load_split_needs_a_path():
    with pytest.raises(ValueError, match=r"data.path is not set"):
        common.load_split(DataArgs(), RecordingLoader({}), seed=0)


# ------------------------------------------------------------------------------------------------ templates
def test_text_template_sources():
    assert common.text_template(None) is None and common.text_template("chat") is None
    bundled = (RESOURCES / "prompts" / "alpaca_sft.prompt").read_text()
    assert common.text_template("alpaca_sft") == bundled
    inline = "Q: {prompt}\nA: {response}"
    assert common.text_template(inline) == inline
    with pytest.raises(FileNotFoundError, match=r"no bundled prompt 'alpacca'; valid names: .*alpaca_sft"):
        common.text_template("alpacca")


@pytest.mark.parametrize("template, prompt, expected", [
    ("Q: {prompt}\nA: {response}", "2+2?", "Q: 2+2?\nA: "),
    ("### Instruction:\n{instruction}\n\n### Response:\n{response}", "Hi",
     "### Instruction:\nHi\n\n### Response:\n"),
    ("{question} => {response} <end>", "why", "why => "),
    ("no response slot: {prompt}!", "x", "no response slot: x!"),
    # the prompt's own braces are text, never slots
    ("I: {instruction}\nR: {response}", "say {response} and {prompt}", "I: say {response} and {prompt}\nR: "),
])
def test_fill_template(template, prompt, expected):
    assert common.fill_template(template, prompt) == expected


def test_fill_template_on_the_bundled_alpaca_prompt():
    text = (RESOURCES / "prompts" / "alpaca_sft.prompt").read_text()
    start, end = text.index("{instruction}"), text.index("{response}")
    expected = text[:start] + "Add 2 and 3." + text[start + len("{instruction}"):end]
    assert common.fill_template(text, "Add 2 and 3.") == expected


# ------------------------------------------------------------------------------------------------ lora_config
# every LoraArgs field (but the switch) and the peft.LoraConfig attribute it becomes
LORA_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
               "bias": "bias", "modules_to_save": "modules_to_save", "use_rslora": "use_rslora"}


def test_lora_config_maps_every_field():
    assert {f.name for f in dataclasses.fields(LoraArgs)} - {"enabled"} == set(LORA_FIELDS)
    args = LoraArgs(enabled=True, r=4, alpha=12, dropout=0.2, target_modules=["q_proj", "v_proj"],
                    bias="lora_only", modules_to_save=["lm_head"], use_rslora=True)
    cfg = common.lora_config(args, task_type="SEQ_CLS")
    got = (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.use_rslora)
    assert got == (4, 12, 0.2, "lora_only", True)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and list(cfg.modules_to_save) == ["lm_head"]
    assert cfg.task_type == "SEQ_CLS"
    default = common.lora_config(LoraArgs(enabled=True))
    got = (default.r, default.lora_alpha, default.target_modules, default.task_type)
    assert got == (16, 32, "all-linear", "CAUSAL_LM")
    assert default.modules_to_save is None and default.use_rslora is False


def test_lora_config_is_none_when_disabled():
    assert common.lora_config(None) is None
    assert common.lora_config(LoraArgs()) is None  # enabled defaults to False
    assert common.lora_config(LoraArgs(enabled=False, r=64)) is None


def test_lora_config_takes_effect_on_a_model(tiny_model):
    from peft import get_peft_model

    cfg = common.lora_config(LoraArgs(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                      use_rslora=True))
    peft_model = get_peft_model(copy.deepcopy(tiny_model), cfg)
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (4, 32)  # (r, hidden_size)
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)


# ------------------------------------------------------------------------------------------------ varlen
def _recipe(stage="sft", attn=None, **train):
    return SimpleNamespace(stage=stage, model=ModelArgs(attn_implementation=attn),
                           train=SimpleNamespace(**train))


@pytest.fixture
def sdpa_model(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("recipe", [
    _recipe(padding_free=True),
    _recipe(packing=True, packing_strategy="bfd"),
    _recipe(packing=True, packing_strategy="bfd_split"),
    _recipe(padding_free=True, packing=True, packing_strategy="wrapped"),
], ids=["padding_free", "bfd", "bfd_split", "padding_free+wrapped"])
def test_varlen_attention_for_padding_free_sft_on_sdpa(sdpa_model, recipe):
    assert common.use_varlen_attention(sdpa_model, recipe) is True
    assert sdpa_model.config._attn_implementation == VARLEN_SDPA


@pytest.mark.parametrize("recipe", [
    _recipe(),  # padded batches
    _recipe(padding_free=False, packing=True, packing_strategy="wrapped"),  # wrapped packing pads nothing
    _recipe(packing=False, packing_strategy="bfd"),  # the strategy alone does not pack
    _recipe(attn="sdpa", padding_free=True),  # the recipe chose the kernel
    _recipe(attn="eager", padding_free=True),
    _recipe(stage="dpo", padding_free=True),  # other stages pad
    _recipe(stage="reward", packing=True, packing_strategy="bfd"),
], ids=["padded", "wrapped", "strategy-only", "named-sdpa", "named-eager", "dpo", "reward"])
def test_varlen_attention_left_alone(sdpa_model, recipe):
    assert common.use_varlen_attention(sdpa_model, recipe) is False
    assert sdpa_model.config._attn_implementation == "sdpa"


def test_varlen_attention_not_on_other_kernels(sdpa_model):
    sdpa_model.set_attn_implementation("eager")
    assert common.use_varlen_attention(sdpa_model, _recipe(padding_free=True)) is False
    assert sdpa_model.config._attn_implementation == "eager"


def test_varlen_attention_with_trl_sft_config(sdpa_model, tmp_path):
    """TRL's own config: packing=True with its default strategy (bfd) is padding-free."""
    cpu = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False}
    train = SFTConfig(packing=True, **cpu)
    assert common.use_varlen_attention(sdpa_model, SimpleNamespace(stage="sft", model=ModelArgs(),
                                                                   train=train))
    plain = copy.deepcopy(sdpa_model)
    plain.set_attn_implementation("sdpa")
    untouched = SFTConfig(**cpu)
    assert not common.use_varlen_attention(plain, SimpleNamespace(stage="sft", model=ModelArgs(),
                                                                  train=untouched))


# ------------------------------------------------------------------------------------------- checked_loader
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _loader(stage_dir, on_error="raise"):
    data = types.SimpleNamespace(columns=None, template=None, on_error=on_error, decontaminate=False)
    return common.checked_loader(data, "sft", None, None, stage_dir)


def test_checked_loader_keeps_the_first_rows_and_saves_the_report(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    kept = _loader(tmp_path / "stage")(path, "train", 3, "train")
    assert kept == rows[:3]
    report = json.loads((tmp_path / "stage" / "data_check_train.json").read_text())
    assert report["rows_kept"] == 3
    assert "| kept | 3 |" in (tmp_path / "stage" / "data_check_train.md").read_text()
    assert _loader(tmp_path / "stage")(path, "train", None, "eval") == rows
    assert json.loads((tmp_path / "stage" / "data_check_eval.json").read_text())["rows_kept"] == 5


def test_checked_loader_refuses_malformed_rows_naming_the_first(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2"},
                                         {"prompt": "q3", "completion": 3}])
    with pytest.raises(ValueError,
                       match=rf"2 malformed data rows, first: {path} line 2: field 'prompt': missing"):
        _loader(tmp_path / "stage")(path, "train", None, "train")
    assert (tmp_path / "stage" / "data_check_train.md").is_file()  # the full list is there to read


def test_checked_loader_refuses_when_nothing_is_kept(tmp_path):
    empty = _jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": " "},
                                          {"prompt": "", "completion": "a"}])
    with pytest.raises(ValueError, match=r"no rows kept of 2 read \(2 empty text; 0 malformed\)"):
        _loader(tmp_path / "stage")(empty, "train", None, "train")
    # duplicates are dropped, one copy kept
    twice = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 2)
    assert _loader(tmp_path / "stage")(twice, "train", None, "train") == [{"prompt": "q", "completion": "a"}]


# ---------------------------------------------------------------------------------------- callbacks, resume
def test_stage_callbacks(tmp_path):
    metrics, interrupt = common.stage_callbacks(tmp_path / "s")
    assert isinstance(metrics, MetricsJsonlCallback) and metrics.path == tmp_path / "s" / "metrics.jsonl"
    assert isinstance(interrupt, GracefulInterruptCallback) and not interrupt.requested




def test_checked_loader_limit_applies_to_what_is_checked(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                         {"prompt": "c", "completion": "d"}, {"prompt": "bad"}])
    assert _loader(tmp_path / "stage")(path, "train", 1, "train") == [{"prompt": "a", "completion": "b"}]
    report = json.loads((tmp_path / "stage" / "data_check_train.json").read_text())
    assert report["rows_read"] == report["rows_kept"] + report["rows_dropped"] + len(report["malformed"])


def test_checked_loader_on_error_drop_leaves_malformed_rows_out(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2"},
                                         {"prompt": "q3", "completion": "c"}])
    kept = _loader(tmp_path / "stage", on_error="drop")(path, "train", None, "train")
    assert kept == [{"prompt": "q", "completion": "a"}, {"prompt": "q3", "completion": "c"}]
    report = json.loads((tmp_path / "stage" / "data_check_train.json").read_text())
    assert [m["line"] for m in report["malformed"]] == [2]


@pytest.mark.slow
def test_quantized_adapter_is_merged_onto_a_full_precision_copy(tmp_path):
    """A QLoRA stage hands the next stage a full model: base (float32) + adapter, equal to applying the adapter."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = build_tiny_llama(tmp_path / "tiny64", hidden_size=64, intermediate_size=128)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False)
    model, tokenizer, _ = load_model(base_dir, quantization="4bit", lora=lora, device="cpu")
    adapter_dir = tmp_path / "final"
    model.save_pretrained(adapter_dir)
    trainer = types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace(unwrap_model=lambda m: m),
                                    is_world_process_zero=lambda: True)
    out = common._save_merged(trainer, tokenizer, adapter_dir, tmp_path / "final_merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, full.eval()(ids).logits, atol=1e-5, rtol=0)
