"""DPO stage: alignkit's losses inside TRL's DPOTrainer give TRL's loss and gradient; runs on the tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_stage
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.train.compact_head import has_compact_lm_head
from alignkit.train.dpo import AlignkitDPOTrainer, DPOArgs, to_trl_pairs

PAIRS = [("What is 2 plus 2?", "It is 4.", "It is 5, I think, or maybe 6."),
         ("Name a colour.", "Blue.", "A colour is a colour."),
         ("Say hi.", "Hi there!", "No."),
         ("Count to three.", "One, two, three.", "One, three.")]


def _dataset(template=None):
    from alignkit.data.preference import PreferencePair

    return to_trl_pairs([PreferencePair(p, c, r) for p, c, r in PAIRS], template)


def _trainer(tmp_path, model_dir, ref_dir, *, batch=2, **kw):
    torch.manual_seed(0)
    args = DPOArgs(output_dir=str(tmp_path / kw.get("loss", "trl")), per_device_train_batch_size=batch,
                   max_length=64, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                   **kw)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    return AlignkitDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_dataset(),
                              processing_class=tok)


def _loss_and_grads(trainer):
    """Loss and gradients of ``trainer`` on the first batch of its own dataloader."""
    return _loss_and_grads_of(trainer, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))


def _loss_and_grads_of(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, inputs


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-ref"), seed=1)  # a reference unlike the policy


# alignkit loss name + kwargs  <->  TRL loss_type + kwargs (same definition in TRL 1.16)
MATCHES = [
    ("dpo", {}, ["sigmoid"], {}, 2),
    ("ipo", {}, ["ipo"], {}, 2),
    ("robust", {"label_smoothing": 0.2}, ["robust"], {"label_smoothing": 0.2}, 2),
    ("hinge", {}, ["hinge"], {}, 2),
    # cDPO (label smoothing) has no loss_type in TRL 1.16's DPOTrainer; "aot" with one pair per batch
    # sorts nothing and reduces exactly to -(1-eps) log s(beta h) - eps log s(-beta h)
    ("cdpo", {"label_smoothing": 0.15}, ["aot"], {"label_smoothing": 0.15}, 1),
]


@pytest.mark.parametrize("name,kw,trl_type,trl_kw,batch", MATCHES, ids=[m[0] for m in MATCHES])
def test_same_loss_and_gradient_as_trl(tmp_path, tiny_model_dir, ref_dir, name, kw, trl_type, trl_kw, batch):
    ours = _trainer(tmp_path, tiny_model_dir, ref_dir, batch=batch, loss=name, beta=0.5, **kw)
    theirs = _trainer(tmp_path, tiny_model_dir, ref_dir, batch=batch, loss="trl", loss_type=trl_type,
                      beta=0.5, **trl_kw)
    loss_a, grads_a, inputs_a = _loss_and_grads(ours)
    loss_b, grads_b, inputs_b = _loss_and_grads(theirs)
    assert torch.equal(inputs_a["input_ids"], inputs_b["input_ids"])  # same batch
    assert loss_a.item() > 0 and torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-7), key
    # the logged reward metrics have TRL's names and values
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours._metrics["train"][key] == pytest.approx(theirs._metrics["train"][key], abs=1e-5)


def _manual_logps(model, inputs):
    """float64 summed completion log-probs from a plain forward (independent of TRL's fused head)."""
    ids, mask = inputs["input_ids"], inputs["completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits.double()  # (2B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
    return (logp * mask[:, 1:]).sum(1), mask.sum(1).double()


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_loss_matches_float64_hand_computation(tmp_path, tiny_model_dir, ref_dir, name):
    beta, gamma = 0.5, 0.3
    extra = {"simpo_gamma": gamma} if name == "simpo" else {}  # other losses refuse an unread simpo_gamma
    trainer = _trainer(tmp_path, tiny_model_dir, ref_dir, loss=name, beta=beta, **extra)
    loss, grads, inputs = _loss_and_grads(trainer)
    logps, lens = _manual_logps(trainer.model, inputs)
    c, r = logps.chunk(2)
    cl, rl = lens.chunk(2)
    if name == "dpo":
        ref, _ = _manual_logps(trainer.ref_model, inputs)
        c0, r0 = ref.chunk(2)
        expected = -torch.nn.functional.logsigmoid(beta * ((c - c0) - (r - r0))).mean()
    elif name == "simpo":  # Meng et al. 2024 Eq. 6
        expected = -torch.nn.functional.logsigmoid(beta * (c / cl - r / rl) - gamma).mean()
    else:  # ORPO: NLL of chosen tokens + lambda * -log sigmoid(log odds ratio), mean logps
        mc, mr = c / cl, r / rl
        log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
        expected = -c.sum() / cl.sum() - beta * torch.nn.functional.logsigmoid(log_odds).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_unknown_loss_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preference loss 'dop'; valid names: cdpo, dpo"):
        DPOArgs(output_dir=str(tmp_path), loss="dop", use_cpu=True, bf16=False)


def _write_pairs(path, n=12):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, model_dir, data, overrides):
    return load_stage(tmp_path, "dpo", f"stage: dpo\nmodel: {{name_or_path: {model_dir}}}\n"
                      f"data: {{path: {data}, val_size: 4}}\n"
                      "train: {max_steps: 2, per_device_train_batch_size: 2, per_device_eval_batch_size: 4, "
                      "max_length: 48, logging_steps: 1, report_to: none, gradient_checkpointing: false, "
                      "save_strategy: 'no', learning_rate: 1.0e-3}\n", overrides)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["lora.enabled=true", "lora.r=4", "train.loss=dpo"],
    ["train.loss=ipo", "train.precompute_ref_log_probs=true"],
    ["train.loss=simpo"],
    ["lora.enabled=true", "train.loss=orpo"],
    ["train.loss=cdpo", "train.label_smoothing=0.1"],
    ["lora.enabled=true", "lora.r=4", "train.loss=dpo", "train.padding_free=true"],
    ["train.loss=dpo", "train.padding_free=true", "train.precompute_ref_log_probs=true", "train.ref_cache_dir=off"],
], ids=["lora-dpo", "full-ipo-precomputed", "full-simpo", "lora-orpo", "full-cdpo", "lora-dpo-padding-free",
        "full-dpo-padding-free-precomputed"])
def test_run_stage(tmp_path, tiny_model_dir, overrides):
    from alignkit.train import dpo

    stage = _recipe(tmp_path, tiny_model_dir, _write_pairs(tmp_path / "pairs.jsonl"), overrides)
    result = dpo.run(stage, tmp_path / "out", None)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m and "rewards/accuracies" in m]
    assert [m["step"] for m in train_rows] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in train_rows)
    assert "eval_rewards/accuracies" in result["metrics"]
    assert (tmp_path / "out" / "final").is_dir() and (tmp_path / "out" / "curves.png").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(result["model_dir"])  # a full model folder either way
    assert reloaded.config.vocab_size == 50257
    assert (tmp_path / "out" / "data_check_train.md").is_file()


def test_trl_loss_type_ipo_trains_ipo(tmp_path, tiny_model_dir):
    """The issue's probe: ``loss_type: ipo`` with no ``loss`` used to train sigmoid DPO (step-1 loss 0.6931).
    Policy = reference, so every log-ratio is 0: DPO gives log 2, IPO (h - 1/(2 beta))^2 = 25 at beta 0.1."""
    by_loss_type = _trainer(tmp_path, tiny_model_dir, tiny_model_dir, loss_type=["ipo"], beta=0.1)
    assert by_loss_type.args.loss == "ipo"
    assert _loss_and_grads(by_loss_type)[0].item() == pytest.approx(25.0, rel=1e-6)
    default = _trainer(tmp_path, tiny_model_dir, tiny_model_dir, beta=0.1)
    assert default.args.loss == "dpo"
    assert _loss_and_grads(default)[0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_args_refuse_conflicts_and_unread_values(tmp_path):
    base = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match=r"loss='ipo' and loss_type=\['hinge'\] name different losses"):
        DPOArgs(loss="ipo", loss_type="hinge", **base)
    with pytest.raises(ValueError, match=r"train\.label_smoothing is read by losses cdpo, robust, simpo and trl"):
        DPOArgs(loss="dpo", label_smoothing=0.1, **base)
    assert DPOArgs(loss_type="exo_pair", label_smoothing=0.1, **base).loss == "trl"  # TRL reads it there
    assert DPOArgs(ld_alpha=0.5, **base).loss == "trl"  # a TRL-only knob: TRL's own loss runs


def test_ignored_keys_contract(tmp_path, tiny_model_dir):
    from alignkit.train import dpo

    stage = _recipe(tmp_path, tiny_model_dir, _write_pairs(tmp_path / "pairs.jsonl"), ["train.loss=simpo"])
    keys = dpo.ignored_keys(stage)
    assert all(k.startswith("train.") and msg.startswith(k + " is ") and "\n" not in msg for k, msg in keys.items())
    assert "train.simpo_gamma" not in keys and "train.label_smoothing" not in keys  # simpo reads both
    assert {"train.loss_type", "train.use_weighting", "train.precompute_ref_log_probs"} <= keys.keys()


# -- padding-free pairs (train.padding_free) -------------------------------------------------------------

LONG_PROMPT = ("Here is a long shared prompt about arithmetic, colours and counting that every token of both "
               "replies must see, and nothing else: what is seven times six?")


def _pf_pair_trainer(tmp_path, model_dir, ref_dir, cls=AlignkitDPOTrainer, pairs=PAIRS, pinned_attention=None,
                     **kw):
    """A DPO trainer on ``pairs`` (tiny Llama policy, seed-1 reference), float32, beta 0.5."""
    from alignkit.data.preference import PreferencePair

    torch.manual_seed(0)
    args_cls = DPOArgs if cls is AlignkitDPOTrainer else __import__("trl").DPOConfig
    args = args_cls(output_dir=str(tmp_path / f"{cls.__name__}-{len(kw)}"), per_device_train_batch_size=4,
                    max_length=64, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                    beta=0.5, **kw)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    data = to_trl_pairs([PreferencePair(p, c, r) for p, c, r in pairs], None)
    extra = {"pinned_attention": pinned_attention} if pinned_attention else {}
    return cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok, **extra)


def _loss_and_grads_on(trainer, rows):
    """Loss and gradients of ``trainer`` on the batch its own collator makes of ``rows`` (same rows for both)."""
    return _loss_and_grads_of(trainer, trainer._prepare_inputs(trainer.data_collator(rows)))


def _rows(trainer):
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]


def _assert_same(a, b):
    loss_a, grads_a, _ = a
    loss_b, grads_b, _ = b
    assert loss_a.item() > 0 and torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6), key


PF_PAIRS = [*PAIRS, (LONG_PROMPT, "Forty-two.", "Seven times six is a hard one; I would say fifty.")]


@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_padding_free_same_loss_and_gradient_as_trl_padded(tmp_path, tiny_model_dir, ref_dir, precompute):
    from trl import DPOTrainer

    extra = {"precompute_ref_log_probs": True, "ref_cache_dir": "off"} if precompute else {}
    ours = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, pairs=PF_PAIRS, loss="dpo", padding_free=True,
                            **extra)
    theirs = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, cls=DPOTrainer, pairs=PF_PAIRS,
                              loss_type=["sigmoid"], precompute_ref_log_probs=precompute)
    assert ours.model.config._attn_implementation == "sdpa_varlen"  # switched from sdpa
    assert has_compact_lm_head(ours.model)  # the LM head runs on the scored positions only
    assert theirs.model.config._attn_implementation == "sdpa"
    rows = _rows(ours)
    a = _loss_and_grads_on(ours, rows)
    b = _loss_and_grads_on(theirs, [theirs.train_dataset[i] for i in range(len(rows))])
    assert a[2]["input_ids"].shape[0] == 1 and b[2]["input_ids"].shape[0] == 2 * len(rows)  # one row vs padded
    assert ours.data_collator.share_prompt  # sdpa_varlen reads shared prompts: each pair's prompt runs once
    shared = sum(len(r["prompt_ids"]) - 1 for r in rows)  # the rejected copy keeps only the last prompt token
    assert a[2]["input_ids"].numel() == int(b[2]["attention_mask"].sum()) - shared  # no pads, prompts once
    if precompute:  # the precompute pass ran on padding-free rows: TRL's padded values
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            assert torch.allclose(a[2][key], b[2][key], atol=1e-5), key
    _assert_same(a, b)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours._metrics["train"][key] == pytest.approx(theirs._metrics["train"][key], abs=1e-4)


def test_padding_free_keeps_sequences_apart(tmp_path, tiny_model_dir, ref_dir):
    """One pair with a long prompt: the rejected sequence follows the chosen one in the row, so attention over the
    whole row (no restarting positions, no cu_seq_lens) would let it read the chosen tokens: that loss differs from
    TRL's, the per-sequence one equals it."""
    from trl import DPOTrainer

    pair = [(LONG_PROMPT, "Forty-two.", "Fifty.")]
    ours = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, pairs=pair, loss="dpo", padding_free=True)
    theirs = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, cls=DPOTrainer, pairs=pair)
    rows = _rows(ours)
    expected = _loss_and_grads_on(theirs, rows)
    _assert_same(_loss_and_grads_on(ours, rows), expected)
    wrong = dict(ours.data_collator(rows))
    for key in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                "shared_prefix_lens"):
        wrong.pop(key)
    ours.model.zero_grad()
    leaked = ours.compute_loss(ours.model, ours._prepare_inputs(wrong)).detach()
    assert abs(leaked.item() - expected[0].item()) > 1e-3  # the check above would catch cross-attention


def test_padding_free_refusals(tmp_path):
    base = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match=r"train\.padding_free is read by alignkit's losses"):
        DPOArgs(loss="trl", padding_free=True, **base)
    with pytest.raises(ValueError, match=r"train\.ref_cache_dir is read with train\.precompute_ref_log_probs"):
        DPOArgs(loss="dpo", ref_cache_dir=str(tmp_path), **base)
    assert DPOArgs(loss="dpo", padding_free=True, precompute_ref_log_probs=True, ref_cache_dir="off", **base)


def test_padding_free_refuses_attention_across_documents(tiny_model_dir, monkeypatch):
    from alignkit.train import common

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.set_attn_implementation("eager")
    monkeypatch.setattr(common.masks, "PER_DOCUMENT_ATTENTION", frozenset())  # force the probe
    monkeypatch.setattr(common.masks, "attends_per_document", lambda m: False)
    with pytest.raises(ValueError, match=r"train\.padding_free: model\.attn_implementation 'eager' attends across"):
        common.per_document_attention(model, setting="train.padding_free")


def test_pinned_sdpa_is_kept_and_shares_no_prompt(tmp_path, tiny_model_dir, ref_dir):
    """A recipe that names sdpa keeps it (the dense block mask from the restarting positions; no shared
    prompts, which only sdpa_varlen reads): still TRL's loss and gradients."""
    from trl import DPOTrainer

    kw = {"loss": "dpo", "padding_free": True}
    ours = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, pairs=PF_PAIRS, pinned_attention="sdpa", **kw)
    theirs = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, cls=DPOTrainer, pairs=PF_PAIRS)
    assert ours.model.config._attn_implementation == "sdpa" and not ours.data_collator.share_prompt
    rows = _rows(ours)
    _assert_same(_loss_and_grads_on(ours, rows), _loss_and_grads_on(theirs, rows))


@pytest.mark.parametrize("mode,shares", [("keep_start", True), ("keep_end", True), ("keep_start", False)])
def test_shared_prompt_under_truncation_and_without_it(tmp_path, tiny_model_dir, ref_dir, monkeypatch, mode, shares):
    """Sequences cut to 24 tokens (keep_end cuts into the prompts, differently for chosen and rejected), and a
    model whose attention fails the shared-prefix probe (each sequence keeps its prompt): TRL's loss and gradients."""
    from trl import DPOTrainer

    from alignkit.train import dpo

    if not shares:
        monkeypatch.setattr(dpo, "honours_shared_prefix", lambda model: False)
    kw = {"max_length": 24, "truncation_mode": mode}
    ours = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, pairs=PF_PAIRS, loss="dpo", padding_free=True)
    theirs = _pf_pair_trainer(tmp_path, tiny_model_dir, ref_dir, cls=DPOTrainer, pairs=PF_PAIRS)
    for trainer in (ours, theirs):
        trainer.args.max_length, trainer.args.truncation_mode = 24, mode
        trainer.data_collator.max_length, trainer.data_collator.truncation_mode = kw["max_length"], mode
    assert ours.data_collator.share_prompt is shares
    rows = _rows(ours)
    a, b = _loss_and_grads_on(ours, rows), _loss_and_grads_on(theirs, rows)
    assert b[2]["input_ids"].shape[1] == 24  # the long pair was cut
    _assert_same(a, b)
