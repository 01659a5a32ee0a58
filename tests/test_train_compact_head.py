"""alignkit.train.compact_head against TRL's fused LM head and a float64 logits reference, and its fallbacks."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from alignkit.train import compact_head as ch

FIELDS = ("log_probs", "entropy", "is_top1")


def _load(model_dir, **config):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config)
    return model.train()


def _batch(seed=0, vocab=None):
    """Two right-padded rows: labels -100 on the prompt and on the pad positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _float64_reference(model, batch):
    """log_softmax of the model's own logits in float64, shifted; entropy; argmax == label; 0 off the mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy.detach(), (logits.argmax(-1) == labels) & mask, mask


def _grads(model, loss):
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_compact_outputs_equal_trl_fused_head_and_float64(tiny_model_dir):
    ours, trl = _load(tiny_model_dir), _load(tiny_model_dir)
    add_fused_lm_head(ours, outputs=("log_probs", *ch.EXTRA_OUTPUTS))
    add_fused_lm_head(trl, outputs=("log_probs", *ch.EXTRA_OUTPUTS))
    assert ch.add_compact_lm_head(ours, keyword="fused_lm_head", outputs=ch.EXTRA_OUTPUTS)
    assert ch.has_compact_lm_head(ours, "fused_lm_head") and not ch.has_compact_lm_head(trl, "fused_lm_head")
    batch = _batch(vocab=ours.config.vocab_size)
    got, theirs = ours(**batch, fused_lm_head=True), trl(**batch, fused_lm_head=True)
    logp, entropy, top1, mask = _float64_reference(ours, batch)
    assert torch.equal(got.label_mask, mask) and torch.equal(theirs.label_mask, mask)
    for out in (got, theirs):
        torch.testing.assert_close(out.log_probs.double(), logp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy.double(), entropy, atol=1e-5, rtol=0)
    assert torch.equal(got.is_top1, top1) and torch.equal(theirs.is_top1, top1)
    # TRL's loss and every parameter's gradient
    torch.testing.assert_close(got.loss, theirs.loss, atol=1e-6, rtol=0)
    assert got.loss.item() == pytest.approx(-logp.sum().item() / mask.sum().item(), abs=1e-6)
    ours_grads, trl_grads = _grads(ours, got.loss), _grads(trl, theirs.loss)
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) == len(list(ours.parameters()))
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_num_items_in_batch_and_shift_labels(tiny_model_dir):
    model = _load(tiny_model_dir)
    assert ch.add_compact_lm_head(model)  # DPO's keyword, no extra outputs
    batch = _batch(seed=1, vocab=model.config.vocab_size)
    logp, _, _, mask = _float64_reference(model, batch)
    out = model(**batch, compact_lm_head=True, num_items_in_batch=torch.tensor(40))
    assert out.entropy is None and out.is_top1 is None
    assert out.loss.item() == pytest.approx(-logp.sum().item() / 40, abs=1e-6)
    # pre-shifted labels are taken as they are: the same per-token values with the last column
    shifted = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "shift_labels": torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], 1)}
    again = model(**shifted, compact_lm_head=True)
    torch.testing.assert_close(again.log_probs[:, :-1], out.log_probs, atol=0, rtol=0)
    assert (again.log_probs[:, -1] == 0).all() and torch.equal(again.label_mask[:, :-1], mask)


def test_calls_without_the_keyword_reach_the_model(tiny_model_dir):
    model, plain = _load(tiny_model_dir), _load(tiny_model_dir)
    ch.add_compact_lm_head(model, outputs=("entropy",))
    batch = _batch(seed=2, vocab=model.config.vocab_size)
    torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=0, rtol=0)
    assert model(**batch).loss.item() == pytest.approx(plain(**batch).loss.item())


@pytest.mark.parametrize("keyword", ch.KEYWORDS)
def test_lora_on_the_head_is_scored_from_the_logits_and_trains(tiny_model_dir, keyword):
    # a LoRA on lm_head (random B, so it changes the logits) wraps the head after installation: both keywords
    # then score the model's own logits, the adapter included. TRL's fused head alone reads lm_head.weight (the
    # LoRA's base) and gives other values: the adapter would be dropped
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    ours, trl = _load(tiny_model_dir), _load(tiny_model_dir)
    for model in (ours, trl):
        add_fused_lm_head(model, outputs=("log_probs", *ch.EXTRA_OUTPUTS))
    ch.add_compact_lm_head(ours, keyword=keyword, outputs=ch.EXTRA_OUTPUTS)
    torch.manual_seed(0)
    ours = get_peft_model(ours, config)
    torch.manual_seed(0)
    trl = get_peft_model(trl, config)
    batch = _batch(seed=3, vocab=ours.config.vocab_size)
    logp, entropy, top1, _ = _float64_reference(ours, batch)
    got = ours(**batch, **{keyword: True})
    torch.testing.assert_close(got.log_probs.double(), logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.entropy.double(), entropy, atol=0, rtol=1e-5)  # ~10.8 summed in float32
    assert torch.equal(got.is_top1, top1)
    grads = _grads(ours, got.loss)
    assert any("lm_head" in n and "lora_B" in n for n in grads)  # the head's adapter trains
    assert (trl(**batch, fused_lm_head=True).log_probs.double() - logp).abs().max() > 1e-3


def test_not_installed_on_rescaled_or_routed_models_and_bad_arguments(tmp_path):
    from conftest import build_tiny_llama

    model = _load(build_tiny_llama(tmp_path / "m"))
    model.config.logits_scaling = 2.0
    assert not ch.add_compact_lm_head(model) and not ch.has_compact_lm_head(model)
    model.config.logits_scaling = None
    model.config.output_router_logits = True
    assert not ch.add_compact_lm_head(model)
    with pytest.raises(ValueError, match="keyword in"):
        ch.add_compact_lm_head(model, keyword="fused")
    with pytest.raises(ValueError, match="outputs among"):
        ch.add_compact_lm_head(model, outputs=("mean_logits",))
