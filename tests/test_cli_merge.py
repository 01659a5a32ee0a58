"""alignkit merge (alignkit.cli.merge): a merged adapter equals the adapter applied at load time; errors."""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from alignkit import models
from alignkit.cli import merge

IDS = torch.tensor([[84, 258, 2, 300, 500, 17, 256, 511]])  # any ids below the tiny vocabulary


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()  # (B, T, V)


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kw)


def test_merge_round_trip_and_adapter_folder(tmp_path, tiny_model_dir, tiny_model, capsys):
    peft_model, _, _ = models.load_model(tiny_model_dir, lora=_lora(init_lora_weights=False), device="cpu")
    peft_model.eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve())
    expected = _logits(peft_model)
    assert (expected - _logits(tiny_model)).abs().max() > 1e-3  # the adapter changes the model
    assert merge.main([str(adapter_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    record = json.loads((tmp_path / "merged" / "alignkit_merge.json").read_text())
    assert record["base"]["kind"] == "folder"
    # an adapter folder loads as base + adapter
    loaded, _, source = models.load_model(adapter_dir, device="cpu")
    assert source.kind == "folder"
    torch.testing.assert_close(_logits(loaded.eval()), expected, atol=1e-5, rtol=0)


def test_merge_errors(tmp_path, capsys):
    assert merge.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope is not a LoRA adapter folder: no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    assert merge.main([str(tmp_path / "a"), str(tmp_path / "out")]) == 2
    assert "base_model_name_or_path is empty; pass --base" in capsys.readouterr().err
