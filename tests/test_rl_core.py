"""alignkit.rl.core against hand numbers, float64 re-implementations and invariants."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from alignkit.rl import (
    approx_kl_k3,
    compute_entropy,
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    get_response_log_probs,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)


# ---------------------------------------------------------------------------------------------- tokenization
def test_tokenize_prompt_and_output_exact(gpt2_tokenizer):
    tok = gpt2_tokenizer
    prompts, outputs = ["Hello world", "Hi"], [" yes<|endoftext|>", " a long answer here"]
    p = [tok.encode(x) for x in prompts]
    o = [tok.encode(x) for x in outputs]
    assert o[0][-1] == tok.eos_token_id  # an output ending in eos, which is also the pad id used here
    got = tokenize_prompt_and_output(prompts, outputs, tok)
    full = [p[i] + o[i] for i in range(2)]
    max_len = max(map(len, full))
    for i in range(2):
        padded = full[i] + [tok.eos_token_id] * (max_len - len(full[i]))
        assert got["input_ids"][i].tolist() == padded[:-1]
        assert got["labels"][i].tolist() == padded[1:]
        # labels[j] is token j + 1 of the full sequence: output tokens are positions len(p)..len(p)+len(o)-1
        expected_mask = [len(p[i]) <= j + 1 < len(p[i]) + len(o[i]) for j in range(max_len - 1)]
        assert got["response_mask"][i].tolist() == expected_mask
    assert got["response_mask"][0].sum() == len(o[0])  # the eos of the output counts although it equals pad
    assert got["input_ids"].dtype == torch.long and got["response_mask"].dtype == torch.bool


def test_tokenize_prompt_and_output_errors(gpt2_tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], gpt2_tokenizer)


# ---------------------------------------------------------------------------------------------- entropy / logps
def test_compute_entropy_float64_and_stability():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7) * 3
    p = torch.softmax(logits.double(), -1)
    expected = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(compute_entropy(logits, chunk_size=2).double(), expected, atol=1e-5, rtol=0)
    huge = torch.full((1, 2, 16), 1e4)  # uniform -> log V, no overflow
    torch.testing.assert_close(compute_entropy(huge), torch.full((1, 2), math.log(16)))
    one_hot = torch.tensor([[[1e4, 0.0, 0.0]]])  # deterministic -> 0
    assert compute_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_get_response_log_probs_tiny_model(tiny_model):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 6))
    labels = torch.randint(0, 1000, (2, 6))
    out = get_response_log_probs(tiny_model, input_ids, labels, return_token_entropy=True)
    with torch.no_grad():
        logits = tiny_model(input_ids).logits.double()  # (2, 6, V)
    lp = torch.log_softmax(logits, -1)
    expected = torch.tensor([[lp[b, t, labels[b, t]].item() for t in range(6)] for b in range(2)])
    torch.testing.assert_close(out["log_probs"].double(), expected.double(), atol=1e-5, rtol=0)
    entropy = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(out["token_entropy"].double(), entropy, atol=1e-4, rtol=0)
    assert "token_entropy" not in get_response_log_probs(tiny_model, input_ids, labels)
    with pytest.raises(ValueError, match="labels has shape"):
        get_response_log_probs(tiny_model, input_ids, labels[:, :3])


# ---------------------------------------------------------------------------------------------- masked reductions
T = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
M = torch.tensor([[True, False, True], [True, True, False]])


def test_masked_normalize_by_hand():
    assert masked_normalize(T, M, normalize_constant=2.0).item() == pytest.approx((1 + 3 + 4 + 5) / 2)
    assert masked_normalize(T, M, dim=1).tolist() == [4.0, 9.0]
    assert masked_normalize(T, M, dim=0, normalize_constant=4.0).tolist() == [1.25, 1.25, 0.75]


def test_masked_mean_by_hand():
    assert masked_mean(T, M).item() == pytest.approx(13 / 4)
    assert masked_mean(T, M, dim=1).tolist() == [2.0, 4.5]
    assert masked_mean(T, M, dim=0).tolist() == [2.5, 5.0, 3.0]
    with pytest.raises(ValueError, match="mask has shape"):
        masked_mean(T, M[:, :2])


# ---------------------------------------------------------------------------------------------- SFT step
def test_sft_microbatch_train_step_value_and_grad():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    loss, meta = sft_microbatch_train_step(logp, mask, gradient_accumulation_steps=2, normalize_constant=5.0)
    # loss = -(1/B) sum_b sum_t m logp / 5 / 2 ;  d/dlogp = -m / (B * 5 * 2)
    expected = -(logp.detach() * mask).sum() / 3 / 5 / 2
    assert loss.item() == pytest.approx(expected.item())
    torch.testing.assert_close(logp.grad, -mask.double() / 30)
    assert meta["nll_per_example"].shape == (3,)


def test_sft_half_batches_with_accumulation_equal_full_batch():
    torch.manual_seed(1)
    base = -torch.rand(4, 5, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.4
    full = base.clone().requires_grad_()
    sft_microbatch_train_step(full, mask, 1)
    halves = base.clone().requires_grad_()
    sft_microbatch_train_step(halves[:2], mask[:2], 2)
    sft_microbatch_train_step(halves[2:], mask[2:], 2)
    torch.testing.assert_close(halves.grad, full.grad)


# ---------------------------------------------------------------------------------------------- rewards
def _reward_fn(response: str, truth: str) -> dict:
    fmt = 1.0 if response.startswith("<") else 0.0
    ans = 1.0 if truth in response else 0.0
    return {"reward": fmt * ans, "format_reward": fmt, "answer_reward": ans}


def test_group_normalized_rewards_by_hand():
    responses = ["<4", "<3", "x4", "<4", "<7", "<7", "<1", "<7"]
    truths = ["4"] * 4 + ["7"] * 4
    raw_expected = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    adv, raw, meta = compute_group_normalized_rewards(_reward_fn, responses, truths, 4, 1e-6, True)
    assert raw.tolist() == raw_expected
    expected = []
    for g in (raw_expected[:4], raw_expected[4:]):
        mean, std = statistics.mean(g), statistics.stdev(g)  # stdev: unbiased (n - 1)
        expected += [(r - mean) / (std + 1e-6) for r in g]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)
    adv_nostd, _, _ = compute_group_normalized_rewards(_reward_fn, responses, truths, 4, 1e-6, False)
    assert adv_nostd.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    assert meta["reward_mean"] == pytest.approx(5 / 8)
    assert meta["reward_max"] == 1.0 and meta["reward_min"] == 0.0
    assert meta["format_reward_mean"] == pytest.approx(7 / 8)
    assert meta["answer_reward_mean"] == pytest.approx(6 / 8)
    assert meta["reward_std"] == pytest.approx(statistics.stdev(raw_expected), rel=1e-5)


def test_group_normalized_rewards_errors():
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        compute_group_normalized_rewards(_reward_fn, ["a"] * 4, ["b"] * 4, 3, 1e-6, True)
    with pytest.raises(KeyError, match="format_reward"):
        compute_group_normalized_rewards(lambda r, t: {"reward": 1.0}, ["a"], ["b"], 1, 1e-6, False)


# ---------------------------------------------------------------------------------------------- policy-gradient losses
def test_naive_policy_gradient_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    loss = compute_naive_policy_gradient_loss(torch.tensor([[2.0], [-1.0]]), logp)
    assert loss.tolist() == [[2.0, 4.0], [-0.5, -0.25]]
    with pytest.raises(ValueError, match="raw_rewards_or_advantages must be"):
        compute_naive_policy_gradient_loss(torch.ones(3, 1), logp)


def test_grpo_clip_loss_by_hand():
    old = torch.zeros(2, 3)
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = torch.tensor([[1.0], [-1.0]])
    loss, meta = compute_grpo_clip_loss(adv, torch.log(ratios), old, cliprange=0.2)
    # A=+1: -min(r, clip(r)) = [-0.5, -1, -1.2] ; A=-1: -min(-r, -clip(r)) = max(r, clip(r)) = [0.8, 1, 1.5]
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2], [0.8, 1.0, 1.5]]))
    assert meta["clipped"].tolist() == [[False, False, True], [True, False, False]]


def test_policy_gradient_dispatch_and_errors():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, _ = compute_policy_gradient_loss(logp, "no_baseline", raw_rewards=torch.tensor([[3.0]]))
    assert loss.tolist() == [[3.0, 6.0]]
    loss, _ = compute_policy_gradient_loss(logp, "reinforce_with_baseline", advantages=torch.tensor([[-1.0]]))
    assert loss.tolist() == [[-1.0, -2.0]]
    with pytest.raises(ValueError, match="requires old_log_probs, cliprange"):
        compute_policy_gradient_loss(logp, "grpo_clip", advantages=torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="valid: no_baseline"):
        compute_policy_gradient_loss(logp, "ppo")


def _manual_grpo_loss(logp, old, adv, mask, eps, gas, constant=None):
    """float64 GRPO-clip loss with python loops over sequences and tokens."""
    total = 0.0
    for b in range(logp.shape[0]):
        seq = 0.0
        for t in range(logp.shape[1]):
            if mask[b, t]:
                ratio = torch.exp(logp[b, t] - old[b, t])
                seq = seq - torch.minimum(ratio * adv[b], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[b])
        total = total + (seq / (constant if constant else mask[b].sum()))
    return total / logp.shape[0] / gas


@pytest.mark.parametrize("constant", [None, 7.0])
def test_grpo_microbatch_train_step_grad_matches_float64(constant):
    torch.manual_seed(0)
    base = -torch.rand(3, 5, dtype=torch.float64)
    old = base + 0.3 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.tensor([[1.5], [-0.7], [0.2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    ours = base.clone().requires_grad_()
    kw = {"length_normalization": "constant", "normalize_constant": constant} if constant else {}
    loss, meta = grpo_microbatch_train_step(ours, mask, 2, "grpo_clip", advantages=adv, old_log_probs=old,
                                            cliprange=0.2, **kw)
    ref = base.clone().requires_grad_()
    expected = _manual_grpo_loss(ref, old, adv[:, 0], mask, 0.2, 2, constant)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item())
    torch.testing.assert_close(ours.grad, ref.grad)
    assert 0.0 <= meta["clip_fraction"].item() <= 1.0


def test_grpo_half_batches_with_accumulation_equal_full_batch():
    torch.manual_seed(2)
    base = -torch.rand(4, 6, dtype=torch.float64)
    adv = torch.randn(4, 1, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    full = base.clone().requires_grad_()
    grpo_microbatch_train_step(full, mask, 1, "reinforce_with_baseline", advantages=adv)
    halves = base.clone().requires_grad_()
    for sl in (slice(0, 2), slice(2, 4)):
        grpo_microbatch_train_step(halves[sl], mask[sl], 2, "reinforce_with_baseline", advantages=adv[sl])
    torch.testing.assert_close(halves.grad, full.grad)


def test_grpo_step_kl_penalty_and_bad_normalization():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, meta = grpo_microbatch_train_step(logp, mask, 1, "no_baseline", raw_rewards=torch.zeros(1, 1),
                                            ref_log_probs=ref, kl_beta=0.5)
    k3 = math.exp(-0.5) + 0.5 - 1  # first token; second token 0
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    assert meta["kl"].item() == pytest.approx(k3 / 2)
    with pytest.raises(ValueError, match="length_normalization"):
        grpo_microbatch_train_step(logp, mask, 1, "no_baseline", raw_rewards=torch.zeros(1, 1),
                                   length_normalization="sum")


def test_approx_kl_k3_expectation_is_exact_kl():
    # E_{x~pi}[k3] = sum_x pi(x) (ref/pi - log(ref/pi) - 1) = KL(pi || ref) exactly
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    k3 = approx_kl_k3(pi.log(), ref.log())
    kl = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist()))
    assert (pi * k3).sum().item() == pytest.approx(kl)
    assert (k3 >= 0).all()
    assert approx_kl_k3(pi.log(), pi.log()).abs().max().item() == 0.0
