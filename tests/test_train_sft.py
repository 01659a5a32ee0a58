"""SFT stage on the tiny model: unpacked and alignkit-packed, bad rows, Ctrl-C checkpoint + resume."""
from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import TrainerCallback

from alignkit.config import load_recipe
from alignkit.train import common, sft
from alignkit.train.callbacks import read_metrics


def _write_rows(path, n=16, bad_line=None):
    lines = []
    for i in range(n):
        row = {"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."}
        if bad_line is not None and i + 1 == bad_line:
            row = {"prompt": "no completion here"}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _stage(tmp_path, model_dir, data, *overrides, name="sft.yaml"):
    path = tmp_path / name
    path.write_text(f"stage: sft\nmodel: {{name_or_path: {model_dir}}}\n"
                    f"data: {{path: {data}, template: alpaca_sft}}\n"
                    "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 48, logging_steps: 1, "
                    "report_to: none, gradient_checkpointing: false, save_strategy: 'no', learning_rate: 1.0e-3}\n")
    out = tmp_path / "out"
    return load_recipe(path, [f"output_dir={out}", *overrides]).stages["sft"], out


def test_sft_unpacked_with_validation(tmp_path, tiny_model_dir):
    stage, out = _stage(tmp_path, tiny_model_dir, _write_rows(tmp_path / "d.jsonl"), "data.val_size=4",
                        "train.eval_strategy=steps", "train.eval_steps=2")
    result = sft.run(stage, out, None)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(k in rows[0] for k in ("loss", "learning_rate", "grad_norm"))
    assert any("eval_loss" in r for r in rows)
    # the data check kept 12 training rows (16 minus 4 held out) and wrote its report
    report = json.loads((out / "data_check_train.json").read_text())
    assert report["rows_read"] == 16
    assert result["global_step"] == 2 and os.path.isdir(result["model_dir"])
    assert (out / "curves.png").stat().st_size > 1000


def test_sft_alignkit_packing(tmp_path, tiny_model_dir, gpt2_tokenizer, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    stage, out = _stage(tmp_path, tiny_model_dir, _write_rows(tmp_path / "d.jsonl"), "data.packing=alignkit",
                        "train.max_length=32")
    train, val = sft.build_datasets(stage, gpt2_tokenizer, out)
    assert val is None and len(train) > 0
    assert {len(ids) for ids in train["input_ids"]} == {32}  # m + 1 tokens: the packed labels' last token
    # each packed stream starts at a document boundary: the Alpaca header
    assert gpt2_tokenizer.decode(train[0]["input_ids"]).startswith("Below is an instruction")
    result = sft.run(stage, out, None)
    assert result["global_step"] == 2


def test_bad_row_names_file_line_field(tmp_path, tiny_model_dir):
    data = _write_rows(tmp_path / "bad.jsonl", bad_line=5)
    stage, out = _stage(tmp_path, tiny_model_dir, data)
    with pytest.raises(ValueError, match=r"bad\.jsonl line 5 field 'completion'|bad\.jsonl.*5.*completion"):
        sft.run(stage, out, None)


class _CtrlCAt(TrainerCallback):
    """Sends SIGINT to this process at the end of step ``n`` (as a user pressing Ctrl-C)."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_ctrl_c_checkpoint_then_resume_continues_steps_and_lr(tmp_path, tiny_model_dir, monkeypatch):
    data = _write_rows(tmp_path / "d.jsonl", n=24)
    settings = ["train.max_steps=4", "train.lr_scheduler_type=linear", "train.save_strategy=steps",
                "train.save_steps=100"]
    # 1. reference: 4 uninterrupted steps
    (tmp_path / "a").mkdir()
    ref_stage, ref_out = _stage(tmp_path / "a", tiny_model_dir, data, *settings)
    sft.run(ref_stage, ref_out, None)
    ref_lr = {r["step"]: r["learning_rate"] for r in read_metrics(ref_out / "metrics.jsonl") if "loss" in r}
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(ref_out / "metrics.jsonl") if "loss" in r}
    # 2. Ctrl-C after step 2: a checkpoint is saved and the stage reports itself interrupted
    (tmp_path / "b").mkdir()
    stage, out = _stage(tmp_path / "b", tiny_model_dir, data, *settings)
    original = common.stage_callbacks
    monkeypatch.setattr(common, "stage_callbacks", lambda d: [_CtrlCAt(2), *original(d)])
    result = sft.run(stage, out, None)
    assert result["interrupted"] and result["global_step"] == 2
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    # 3. resume=true continues at step 3 with the same schedule (and the same batches)
    monkeypatch.setattr(common, "stage_callbacks", original)
    stage.resume = True
    result = sft.run(stage, out, None)
    assert result["global_step"] == 4 and not result.get("interrupted")
    resumed = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r in resumed:
        assert r["learning_rate"] == pytest.approx(ref_lr[r["step"]], rel=1e-6)
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=1e-4)


def test_padding_free_switches_to_per_document_attention(tmp_path, tiny_model_dir, caplog):
    """train.padding_free on sdpa: the stage trains with sdpa_varlen (loss per document), unless the
    recipe names an attention implementation."""
    from alignkit.models import load_model

    data = _write_rows(tmp_path / "d.jsonl")
    # TRL's BFD packing (its default strategy) is padding-free: documents whole, positions restart
    stage, out = _stage(tmp_path, tiny_model_dir, data, "train.packing=true")
    assert stage.train.packing_strategy == "bfd"
    model, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert common.use_varlen_attention(model, stage) and model.config._attn_implementation == "sdpa_varlen"
    pinned, _ = _stage(tmp_path, tiny_model_dir, data, "train.padding_free=true", "model.attn_implementation=eager",
                       name="pinned.yaml")
    plain, _ = _stage(tmp_path, tiny_model_dir, data, name="plain.yaml")
    for recipe in (pinned, plain):
        other, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu",
                                 attn_implementation=recipe.model.attn_implementation)
        assert not common.use_varlen_attention(other, recipe)
    with caplog.at_level("INFO", logger="alignkit.train"):
        result = sft.run(stage, out, None)
    assert result["global_step"] == 2
    assert "attention set to sdpa_varlen" in caplog.text


def test_padding_free_without_packing_keeps_max_length_by_the_data_check(tmp_path, tiny_model_dir):
    """train.padding_free without packing, train.max_length set: TRL's padding-free collator cannot truncate
    (TRL refuses a max_length there), so the data check's drop of longer rows is what holds the limit; the
    stage trains, and no document TRL feeds the model is longer than max_length."""
    rows = [{"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."} for i in range(12)]
    rows += [{"prompt": f"Say many words {i}.", "completion": "word " * 80} for i in range(4)]  # >> 48 tokens
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage, out = _stage(tmp_path, tiny_model_dir, data, "train.padding_free=true", "train.max_steps=3")
    seen = []  # the longest document of each forward: position ids restart at 0 per document

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(
                lambda mod, a, kw: seen.append(int(kw["position_ids"].max()) + 1), with_kwargs=True)

    original = common.stage_callbacks
    common.stage_callbacks = lambda d, **kw: [Spy(), *original(d, **kw)]
    try:
        result = sft.run(stage, out, None)
    finally:
        common.stage_callbacks = original
    assert result["global_step"] == 3
    report = json.loads((out / "data_check_train.json").read_text())
    assert report["over_max_length"] == 4 and report["rows_kept"] == 12
    assert len(seen) == 3 and 8 < max(seen) <= 48
    assert stage.train.max_length == 48  # the recipe's own args are not changed


def test_sft_refuses_what_its_data_path_ignores(tmp_path, tiny_model_dir):
    """alignkit packing hands TRL packed input_ids: TRL's data-path knobs and other templates are refused;
    TRL's packing_strategy needs packing; data.max_length (the check's row filter) is unread when packing."""
    from alignkit.config import RecipeError

    data = _write_rows(tmp_path / "d.jsonl")
    packed = ("data.packing=alignkit",)
    refused = [
        (packed + ("train.completion_only_loss=true",),
         r"train\.completion_only_loss is read by TRL's SFT data path; this recipe's data\.packing is alignkit"),
        (packed + ("train.packing=true",), r"train\.packing is read by TRL's SFT data path"),
        (packed + ("data.template=chat",), r"data\.template is not applied by data\.packing: alignkit"),
        (("train.packing_strategy=wrapped",), r"train\.packing_strategy is read with train\.packing"),
        (("train.packing=true", "data.max_length=64"), r"data\.max_length is read by the data check of unpacked"),
        (("train.padding_free=true", "data.max_length=64"),
         r"train\.max_length is read by TRL's truncation of padded rows .* padding-free without packing"),
        (("data.format=hh",), r"data\.format is read by stages dpo, reward, kto; this recipe's stage is sft"),
    ]
    for overrides, pattern in refused:
        with pytest.raises(RecipeError, match=pattern):
            _stage(tmp_path, tiny_model_dir, data, *overrides)
    # read where they apply
    stage, _ = _stage(tmp_path, tiny_model_dir, data, "train.packing=true", "train.packing_strategy=wrapped")
    assert stage.train.packing_strategy == "wrapped"
    assert _stage(tmp_path, tiny_model_dir, data, "data.max_length=64")[0].data.max_length == 64
    task_eval_sizes = {"train.task_eval_limit", "train.task_eval_max_new_tokens", "train.task_eval_batch_size",
                       "train.task_eval_prompt"}  # read only with train.task_eval
    assert sft.ignored_keys(stage).keys() == {"data.max_length"} | task_eval_sizes


def test_shipped_recipe_packs_on_per_document_attention(tmp_path, tiny_model_dir):
    """recipes/sft.yaml names no attention: with train.packing=true (TRL's BFD) or train.padding_free=true the
    stage picks sdpa_varlen, never the dense block-diagonal mask of plain sdpa."""
    from alignkit.models import load_model

    recipe_path = common.__file__.replace("alignkit/train/common.py", "recipes/sft.yaml")
    for override in ("train.packing=true", "train.padding_free=true"):
        stage = load_recipe(recipe_path, [f"output_dir={tmp_path / 'o'}", f"model.name_or_path={tiny_model_dir}",
                                          "model.dtype=float32", override]).stages["sft"]
        assert stage.model.attn_implementation is None
        model, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
        assert common.use_varlen_attention(model, stage)
        assert model.config._attn_implementation == "sdpa_varlen"


@pytest.mark.parametrize("padding_free", [False, True])
def test_compact_head_trainer_equals_trl_sft_trainer(tmp_path, tiny_model_dir, padding_free, monkeypatch):
    # TRL's SFTTrainer and AlignkitSFTTrainer on the same rows and seed: the same logged loss, entropy and
    # token accuracy at every step and the same weights after 4 steps; the compact head scored only the
    # completion tokens (TRL's own head, off CUDA, scores every position)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignkit import losses
    from alignkit.attention import VARLEN_SDPA, register_varlen_sdpa

    # a completion the model learns within a step or two, so that token accuracy and entropy move
    rows = [{"prompt": f"Say yes {i}. ", "completion": " yes" * 6} for i in range(8)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    register_varlen_sdpa()
    runs, scored = {}, []  # per kernel call: (positions given, positions with a label, rows the head ran on)
    real_fn, real_kernel = losses.lm_head_log_probs, losses._LMHeadLogProbs.apply

    def spy_fn(hidden, weight, labels, **kw):
        scored.append([labels.numel(), int((labels != -100).sum())])
        return real_fn(hidden, weight, labels, **kw)

    def spy_kernel(hidden, *a):
        scored[-1].append(hidden.shape[0])
        return real_kernel(hidden, *a)
    for name, cls in (("trl", SFTTrainer), ("alignkit", sft.AlignkitSFTTrainer)):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32, attn_implementation=VARLEN_SDPA if padding_free else "sdpa")
        args = SFTConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
                         learning_rate=5e-2, optim="sgd", logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                         data_seed=0, save_strategy="no", padding_free=padding_free, disable_tqdm=True,
                         max_length=None)
        trainer = cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        with monkeypatch.context() as patch:
            patch.setattr("alignkit.train.compact_head.lm_head_log_probs", spy_fn)
            patch.setattr(losses._LMHeadLogProbs, "apply", spy_kernel)
            trainer.train()
        logs = [r for r in trainer.state.log_history if "loss" in r]
        runs[name] = (logs, {n: p.detach().clone() for n, p in model.named_parameters()})
    (trl_logs, trl_weights), (ours_logs, ours_weights) = runs["trl"], runs["alignkit"]
    assert len(trl_logs) == len(ours_logs) == 4 and len(scored) == 4  # only the alignkit run used the kernel
    assert 0 < trl_logs[-1]["mean_token_accuracy"] < 1 and trl_logs[-1]["entropy"] < trl_logs[0]["entropy"]
    for a, b in zip(trl_logs, ours_logs):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for n, w in trl_weights.items():
        torch.testing.assert_close(ours_weights[n], w, atol=1e-5, rtol=1e-4, msg=n)
    # the head ran on the completion tokens only: fewer rows than positions, exactly those with a label
    assert all(0 < rows == labelled < given for given, labelled, rows in scored)
