"""alignkit.losses against hand numbers, float64 re-implementations and TRL's own loss functions."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.losses import (
    PREFERENCE_LOSSES,
    get_preference_loss,
    per_instance_dpo_loss,
    selective_log_softmax,
    sequence_log_probs,
)
from alignkit.resources import prompt


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_selective_log_softmax_matches_float64_log_softmax(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 4  # (B, T, V)
    index = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_selective_log_softmax_bf16_input_is_computed_in_float32():
    torch.manual_seed(1)
    logits = (torch.randn(3, 7, 50) * 10).bfloat16()
    index = torch.randint(0, 50, (3, 7))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=4).double(), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_gradient_matches_float64_autograd(dtype):
    torch.manual_seed(3)
    base = torch.randn(2, 4, 9) * 3
    index = torch.randint(0, 9, (2, 4))
    upstream = torch.randn(2, 4, dtype=torch.float64)
    ours = base.to(dtype).clone().requires_grad_()
    (selective_log_softmax(ours, index, chunk_size=3).double() * upstream).sum().backward()
    ref = base.to(dtype).double().detach().requires_grad_()
    (torch.log_softmax(ref, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1) * upstream).sum().backward()
    assert ours.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 gradient storage
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=tol, rtol=0)


def test_selective_log_softmax_default_chunk_is_bounded(monkeypatch):
    from alignkit import losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 20)  # V = 7 -> 2 rows per chunk
    seen = []
    real_logsumexp = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda x, dim: seen.append(x.shape[0]) or real_logsumexp(x, dim=dim))
    logits, index = torch.randn(5, 7), torch.randint(0, 7, (5,))
    got = losses.selective_log_softmax(logits, index)
    assert seen == [2, 2, 1]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, index[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_selective_log_softmax_shape_error():
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_sequence_log_probs_mask_and_ignore_index():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, -100, -100], [0, 5, 3, -100]])
    lp = torch.log_softmax(logits.double(), -1)
    expected = [lp[0, 0, 1] + lp[0, 1, 2], lp[1, 0, 0] + lp[1, 1, 5] + lp[1, 2, 3]]
    got = sequence_log_probs(logits, labels)
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=1e-5, rtol=0)
    mean = sequence_log_probs(logits, labels, average=True)
    torch.testing.assert_close(mean.double(), torch.stack([expected[0] / 2, expected[1] / 3]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits must be"):
        sequence_log_probs(logits[0], labels)


# ---------------------------------------------------------------------------------------------- per-instance DPO
def _manual_logp(model, tokenizer, prompt_text: str, response: str) -> float:
    """float64 log p(whole text) with a python loop over positions."""
    template = prompt("alpaca_sft")
    text = template.replace("{instruction}", prompt_text).replace("{response}", response)
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)))


def test_per_instance_dpo_loss_by_hand(tiny_model, gpt2_tokenizer):
    lm = copy.deepcopy(tiny_model).train()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = tiny_model
    beta, pr, yw, yl = 0.5, "Name a colour.", "Blue.", "I refuse to answer {that}."
    got = per_instance_dpo_loss(lm, ref, gpt2_tokenizer, beta, pr, yw, yl)
    h = (_manual_logp(lm, gpt2_tokenizer, pr, yw) - _manual_logp(ref, gpt2_tokenizer, pr, yw)) - (
        _manual_logp(lm, gpt2_tokenizer, pr, yl) - _manual_logp(ref, gpt2_tokenizer, pr, yl)
    )
    assert got.dim() == 0
    assert got.item() == pytest.approx(-_logsig(beta * h), abs=1e-4)
    # gradient reaches lm only
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    assert all(p.grad is None for p in ref.parameters())


def test_per_instance_dpo_loss_same_model_is_log2(tiny_model, gpt2_tokenizer):
    loss = per_instance_dpo_loss(tiny_model, tiny_model, gpt2_tokenizer, 0.1, "a", "b", "c")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_instance_dpo_loss_models_on_different_devices(tiny_model, gpt2_tokenizer):
    lm = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    on_cpu = per_instance_dpo_loss(lm, tiny_model, gpt2_tokenizer, 0.5, "Hi", "Hello.", "Go away.")
    lm_gpu = copy.deepcopy(lm).cuda()
    mixed = per_instance_dpo_loss(lm_gpu, tiny_model, gpt2_tokenizer, 0.5, "Hi", "Hello.", "Go away.")
    assert mixed.device.type == "cuda"
    assert mixed.item() == pytest.approx(on_cpu.item(), abs=1e-4)
    mixed.backward()
    assert all(p.grad is None for p in tiny_model.parameters())


# ---------------------------------------------------------------------------------------------- loss table
PC, PR, RC, RR = [-1.0, -6.0], [-3.0, -2.0], [-2.0, -5.0], [-2.5, -2.5]
LC, LR = [2.0, 4.0], [3.0, 1.0]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _call(name, **kw):
    fn = get_preference_loss(name)
    return fn(_t(PC), _t(PR), _t(RC), _t(RR), **kw)


def test_dpo_by_hand():
    losses, cr, rr = _call("dpo", beta=0.1)
    # pair 0: chosen ratio 1, rejected ratio -0.5, h = 1.5; pair 1: -1, 0.5, h = -1.5
    assert losses.tolist() == pytest.approx([-_logsig(0.15), -_logsig(-0.15)])
    assert cr.tolist() == pytest.approx([0.1, -0.1]) and rr.tolist() == pytest.approx([-0.05, 0.05])
    assert not cr.requires_grad


def test_cdpo_by_hand_and_reduces_to_dpo():
    eps = 0.2
    losses, _, _ = _call("cdpo", beta=0.1, label_smoothing=eps)
    expected = [-(1 - eps) * _logsig(h) - eps * _logsig(-h) for h in (0.15, -0.15)]
    assert losses.tolist() == pytest.approx(expected)
    assert _call("cdpo", beta=0.1)[0].tolist() == pytest.approx(_call("dpo", beta=0.1)[0].tolist())


def test_robust_by_hand():
    eps = 0.1
    losses, _, _ = _call("robust", beta=0.1, label_smoothing=eps)
    expected = [(-(1 - eps) * _logsig(h) + eps * _logsig(-h)) / (1 - 2 * eps) for h in (0.15, -0.15)]
    assert losses.tolist() == pytest.approx(expected)


def test_hinge_by_hand():
    losses, _, _ = _call("hinge", beta=2.0)  # 1 - 2 * 1.5 < 0 -> 0;  1 + 3 = 4
    assert losses.tolist() == pytest.approx([0.0, 4.0])


def test_ipo_by_hand_with_and_without_lengths():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    summed, _, _ = _call("ipo", beta=beta)
    assert summed.tolist() == pytest.approx([(1.5 - 2) ** 2, (-1.5 - 2) ** 2])
    avg, cr, _ = _call("ipo", beta=beta, chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    # pair 0: 1/2 - (-0.5)/3 ; pair 1: -1/4 - 0.5/1
    assert avg.tolist() == pytest.approx([(0.5 + 0.5 / 3 - 2) ** 2, (-0.25 - 0.5 - 2) ** 2])
    assert cr.tolist() == pytest.approx([0.25, -0.25])


def test_simpo_by_hand_reference_free():
    beta, gamma = 2.0, 0.5
    fn = get_preference_loss("simpo")
    losses, cr, rr = fn(_t(PC), _t(PR), beta=beta, gamma=gamma, chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    # mean logps: chosen [-0.5, -1.5], rejected [-1, -2]
    expected = [-_logsig(beta * (-0.5 + 1) - gamma), -_logsig(beta * (-1.5 + 2) - gamma)]
    assert losses.tolist() == pytest.approx(expected)
    assert cr.tolist() == pytest.approx([-1.0, -3.0]) and rr.tolist() == pytest.approx([-2.0, -4.0])
    # same numbers when the caller passes mean logps
    means = fn(_t([-0.5, -1.5]), _t([-1.0, -2.0]), beta=beta, gamma=gamma)[0]
    assert means.tolist() == pytest.approx(expected)


def test_orpo_by_hand():
    beta = 0.1
    fn = get_preference_loss("orpo")
    losses, _, _ = fn(_t(PC), _t(PR), beta=beta, chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    expected = []
    for c, r in [(-0.5, -1.0), (-1.5, -2.0)]:
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        expected.append(-beta * _logsig(log_odds))
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_orpo_stable_near_zero_logp():
    logp = torch.tensor([-1e-9, -50.0], requires_grad=True)
    losses, _, _ = get_preference_loss("orpo")(logp, torch.tensor([-2.0, -1e-4]), beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logp.grad).all()


def test_table_and_errors():
    assert {"dpo", "cdpo", "ipo", "simpo", "orpo"} <= set(PREFERENCE_LOSSES)
    with pytest.raises(ValueError, match="valid names: .*dpo.*simpo"):
        get_preference_loss("kto")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        get_preference_loss("dpo")(_t(PC), _t(PR), beta=0.1)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        get_preference_loss("dpo")(_t(PC), _t(PR), _t(RC), _t([1.0]), beta=0.1)
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        get_preference_loss("simpo")(_t(PC), _t(PR), beta=0.1, chosen_lengths=_t([1.0]))


def test_gradient_of_dpo_matches_float64_autograd():
    pc = _t(PC).requires_grad_()
    losses, _, _ = get_preference_loss("dpo")(pc, _t(PR), _t(RC), _t(RR), beta=0.1)
    losses.mean().backward()
    # d/dpc of -log sigmoid(beta h) / B = -beta * sigmoid(-beta h) / B
    expected = [-0.1 * (1 / (1 + math.exp(0.1 * h))) / 2 for h in (1.5, -1.5)]
    assert pc.grad.tolist() == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- vs TRL itself
def _trl_self(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **kw)


TRL_EXPERIMENTAL = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


@TRL_EXPERIMENTAL
def test_simpo_and_cdpo_equal_trl_cpo_loss():
    from trl.experimental.cpo import CPOTrainer

    mean_c, mean_r = torch.tensor([-0.7, -2.0, -0.1]), torch.tensor([-1.2, -0.4, -0.1])
    ns = _trl_self(beta=2.0, label_smoothing=0.1, loss_type="simpo", simpo_gamma=0.8)
    trl_losses, trl_cr, trl_rr = CPOTrainer.cpo_loss(ns, mean_c, mean_r)
    ours, cr, rr = get_preference_loss("simpo")(mean_c, mean_r, beta=2.0, gamma=0.8, label_smoothing=0.1)
    torch.testing.assert_close(ours, trl_losses)
    torch.testing.assert_close(cr, trl_cr)
    torch.testing.assert_close(rr, trl_rr)
    # CPO's "sigmoid" with label smoothing is cDPO applied to (policy) log-ratios; zero reference logps
    ns = _trl_self(beta=0.3, label_smoothing=0.2, loss_type="sigmoid")
    trl_losses, _, _ = CPOTrainer.cpo_loss(ns, mean_c, mean_r)
    zeros = torch.zeros(3)
    ours, _, _ = get_preference_loss("cdpo")(mean_c, mean_r, zeros, zeros, beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(ours, trl_losses)


@TRL_EXPERIMENTAL
def test_orpo_equals_minus_trl_odds_ratio_term():
    from trl.experimental.orpo import ORPOTrainer

    mean_c, mean_r = torch.tensor([-0.7, -2.0, -0.05]), torch.tensor([-1.2, -0.4, -3.0])
    trl_losses, trl_cr, trl_rr, _, _ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.25), mean_c, mean_r)
    ours, cr, rr = get_preference_loss("orpo")(mean_c, mean_r, beta=0.25)
    torch.testing.assert_close(ours, -trl_losses)
    torch.testing.assert_close(cr, trl_cr)
    torch.testing.assert_close(rr, trl_rr)


# ---------------------------------------------------------------------------------------------- real SmolLM2
@pytest.mark.real_model
def test_real_smollm2_logprobs_and_dpo():
    """On SmolLM2-135M-Instruct (GGUF): chunked log-probs equal float64 log_softmax; DPO of a model against
    itself is log 2; against a perturbed copy it matches a manual float64 forward."""
    from alignkit.models import DEFAULT_MODEL, load_model

    lm, tok, _ = load_model(DEFAULT_MODEL, dtype="float32", device="cpu")
    ids = torch.tensor([tok.encode("The capital of France is Paris.")])
    with torch.no_grad():
        logits = lm(ids).logits  # (1, T, V)
    expected = torch.log_softmax(logits.double(), -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    got = selective_log_softmax(logits[:, :-1], ids[:, 1:], chunk_size=3)[0]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert per_instance_dpo_loss(lm, lm, tok, 0.1, "Say hi.", "Hi!", "No.").item() == pytest.approx(
        math.log(2), abs=1e-5)
    policy = copy.deepcopy(lm)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.01 * torch.randn_like(policy.lm_head.weight))
    loss = per_instance_dpo_loss(policy, lm, tok, 0.1, "Say hi.", "Hi!", "No.")
    h = (_manual_logp(policy, tok, "Say hi.", "Hi!") - _manual_logp(lm, tok, "Say hi.", "Hi!")) - (
        _manual_logp(policy, tok, "Say hi.", "No.") - _manual_logp(lm, tok, "Say hi.", "No."))
    assert loss.item() == pytest.approx(-_logsig(0.1 * h), abs=1e-4)


# ---------------------------------------------------------------------------------------------- declared params
def test_declared_params_are_exactly_the_keyword_parameters():
    import inspect

    from alignkit.losses import LENGTH_PARAMS

    for name, spec in PREFERENCE_LOSSES.items():
        sig = inspect.signature(spec.fn).parameters.values()
        assert not [p for p in sig if p.kind is inspect.Parameter.VAR_KEYWORD], f"{name} takes **kwargs"
        keyword_only = {p.name for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY}
        expected = set(spec.params) | (set(LENGTH_PARAMS) if spec.uses_lengths else set())
        assert keyword_only == expected, name
        assert spec.fn is get_preference_loss(name) and spec.paper


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_undeclared_keyword_raises_type_error(name):
    spec = PREFERENCE_LOSSES[name]
    extra = next(p for p in ("label_smoothing", "gamma", "loss_type") if p not in spec.params)
    with pytest.raises(TypeError, match=extra):
        _call(name, beta=0.1, **{extra: 0.1})
    if not spec.uses_lengths:
        with pytest.raises(TypeError, match="chosen_lengths"):
            _call(name, beta=0.1, chosen_lengths=_t(LC))


def test_table_flags_and_kwargs():
    from alignkit.losses import REFERENCE_FREE, losses_reading

    assert REFERENCE_FREE == {"simpo", "orpo"}
    assert losses_reading("label_smoothing") == ["cdpo", "robust", "simpo"]
    assert losses_reading("gamma") == ["simpo"]
    # TRL 1.16 DPOTrainer loss_types with the same definition (tests/test_train_dpo.py compares the numbers)
    assert {n: s.trl_loss_type for n, s in PREFERENCE_LOSSES.items() if s.trl_loss_type} == {
        "dpo": "sigmoid", "robust": "robust", "hinge": "hinge", "ipo": "ipo"}
    values = {"beta": 0.1, "label_smoothing": 0.2, "gamma": 0.3, "chosen_lengths": 1, "rejected_lengths": 2}
    assert PREFERENCE_LOSSES["dpo"].kwargs(values) == {"beta": 0.1}
    assert PREFERENCE_LOSSES["simpo"].kwargs(values) == values
    assert PREFERENCE_LOSSES["ipo"].kwargs(values) == {"beta": 0.1, "chosen_lengths": 1, "rejected_lengths": 2}
