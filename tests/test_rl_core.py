"""alignkit.rl.core (GRPO and PPO maths) against hand numbers, float64 re-implementations and invariants."""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from alignkit.rl import (
    approx_kl_k3,
    compute_entropy,
    compute_gae,
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    compute_ppo_policy_loss,
    compute_value_loss,
    explained_variance,
    get_response_log_probs,
    get_token_values,
    grpo_microbatch_train_step,
    kl_penalized_rewards,
    masked_mean,
    masked_normalize,
    masked_whiten,
    ppo_microbatch_train_step,
    sft_microbatch_train_step,
    shared_prompt_log_probs,
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


# ---------------------------------------------------------------------------------------------- PPO maths


def test_gae_matches_the_recursion_written_out_in_float64():
    # one row: prompt position 0, response positions 1..3, padding at 4; rewards and values known
    r = [0.0, 0.1, -0.2, 1.5, 9.0]  # 9.0 at the pad position must be ignored
    v = [7.0, 0.5, 0.3, -0.4, 5.0]  # 7.0 (prompt) and 5.0 (pad) must be ignored
    mask = torch.tensor([[False, True, True, True, False]])
    gamma, lam = 0.9, 0.8
    # by hand, from the end of the response (V after the last token = 0):
    d3 = r[3] + gamma * 0.0 - v[3]
    d2 = r[2] + gamma * v[3] - v[2]
    d1 = r[1] + gamma * v[2] - v[1]
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    adv, ret = compute_gae(torch.tensor([r], dtype=torch.float64), torch.tensor([v], dtype=torch.float64), mask,
                           gamma, lam)
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.0, a1 + v[1], a2 + v[2], a3 + v[3], 0.0], abs=1e-12)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    gamma = 0.95
    adv, ret = compute_gae(r, v, mask, gamma, 1.0)
    for b in range(3):
        idx = [t for t in range(6) if mask[b, t]]
        for k, t in enumerate(idx):
            g = sum(gamma ** j * float(r[b, u]) for j, u in enumerate(idx[k:]))
            assert float(ret[b, t]) == pytest.approx(g, abs=1e-10)
            assert float(adv[b, t]) == pytest.approx(g - float(v[b, t]), abs=1e-10)


def test_kl_penalty_per_token_and_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.3, -0.2, -0.1, -0.4]])
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    scores = torch.tensor([[2.0], [-1.0]])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    expected_kl = [[0.0, -1.0, 0.0, 0.0], [0.2, 0.0, -0.2, 0.0]]  # logp - ref where masked
    torch.testing.assert_close(kl, torch.tensor(expected_kl))
    expected = [[0.0, 0.1, 0.0 + 2.0, 0.0], [-0.02, 0.0, 0.02, 0.0 - 1.0]]  # -0.1 * kl, + score at the last
    torch.testing.assert_close(rewards, torch.tensor(expected))
    no_ref, zeros = kl_penalized_rewards(scores, logp, None, mask, kl_coef=0.1)
    assert zeros.abs().sum() == 0 and no_ref[0, 2] == 2.0 and no_ref[1, 3] == -1.0


def test_masked_whiten_invariants():
    torch.manual_seed(1)
    x = torch.randn(4, 7) * 3 + 5
    mask = torch.rand(4, 7) > 0.3
    w = masked_whiten(x, mask)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(w[mask].var(unbiased=True)) == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[~mask] == 0)
    # affine invariance: whiten(a x + b) == whiten(x) for a > 0
    torch.testing.assert_close(masked_whiten(2.5 * x - 4, mask), w, atol=1e-5, rtol=0)
    # order preserved, mean kept without shift
    assert torch.equal(torch.argsort(w[mask]), torch.argsort(x[mask]))
    kept = masked_whiten(x, mask, shift_mean=False)
    assert float(kept[mask].mean()) == pytest.approx(float(x[mask].mean()), abs=1e-4)


def _f64_policy_loss(a, logp, old, eps):
    ratio = math.exp(logp - old)
    return max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))


def test_ppo_policy_loss_against_formula_with_clipped_cases():
    eps = 0.2
    # (advantage, logp, old): inside the range, ratio above 1+eps with A>0 (clipped), below 1-eps with A<0
    # (clipped), above 1+eps with A<0 (unclipped: pessimistic), below 1-eps with A>0 (unclipped)
    cases = [(1.0, -1.0, -1.05), (2.0, -0.5, -1.0), (-1.5, -2.0, -1.0), (-1.0, -0.5, -1.0), (0.7, -2.0, -1.0)]
    a = torch.tensor([[c[0] for c in cases]])
    logp, old = torch.tensor([[c[1] for c in cases]]), torch.tensor([[c[2] for c in cases]])
    loss, meta = compute_ppo_policy_loss(a, logp, old, eps)
    assert loss[0].tolist() == pytest.approx([_f64_policy_loss(*c, eps) for c in cases], abs=1e-6)
    assert meta["clipped"][0].tolist() == [False, True, True, False, False]


def test_value_loss_against_formula_with_clipped_cases():
    eps = 0.2
    # (value, old value, return): inside the range; moved past +eps away from the return (the unclipped
    # error is larger); moved past +eps toward the return (the clipped error is larger: taken); moved past
    # -eps toward the return (clipped taken)
    cases = [(1.1, 1.0, 2.0), (1.5, 1.0, 0.0), (1.5, 1.0, 2.0), (0.2, 1.0, 0.0)]
    v, old, ret = (torch.tensor([[c[i] for c in cases]]) for i in range(3))
    loss, meta = compute_value_loss(v, old, ret, eps)
    expected, clipped = [], []
    for val, o, r in cases:
        vc = o + min(max(val - o, -eps), eps)
        expected.append(0.5 * max((val - r) ** 2, (vc - r) ** 2))
        clipped.append((vc - r) ** 2 > (val - r) ** 2)
    assert loss[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert meta["clipped"][0].tolist() == clipped == [False, False, True, True]


def test_ppo_microbatch_step_value_and_gradients():
    torch.manual_seed(2)
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    old, old_v, ret, adv = (torch.randn(2, 4, dtype=torch.float64) for _ in range(4))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    loss, meta = ppo_microbatch_train_step(logp, values, mask, 2, advantages=adv, old_log_probs=old,
                                           old_values=old_v, returns=ret, cliprange=0.2, cliprange_value=0.3,
                                           vf_coef=0.5)
    # reference: token means over the micro-batch, written out
    idx = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
    lp, vv = logp.detach(), values.detach()
    pg = sum(_f64_policy_loss(float(adv[b, t]), float(lp[b, t]), float(old[b, t]), 0.2) for b, t in idx) / len(idx)
    vf = 0.0
    for b, t in idx:
        vc = float(old_v[b, t]) + min(max(float(vv[b, t] - old_v[b, t]), -0.3), 0.3)
        vf += 0.5 * max((float(vv[b, t]) - float(ret[b, t])) ** 2, (vc - float(ret[b, t])) ** 2)
    vf /= len(idx)
    assert float(loss) == pytest.approx((pg + 0.5 * vf) / 2, abs=1e-10)
    assert float(meta["policy_loss"]) == pytest.approx(pg, abs=1e-10)
    assert float(meta["value_loss"]) == pytest.approx(vf, abs=1e-10)
    assert torch.all(logp.grad[~mask] == 0) and torch.all(values.grad[~mask] == 0)


def test_explained_variance_by_hand():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4, dtype=torch.bool)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), ret, mask) == pytest.approx(0.0)
    v = torch.tensor([1.5, 2.0, 2.5, 4.0])  # residuals .5 0 -.5 0: var .125; var(ret) 1.25
    assert explained_variance(v, ret, mask) == pytest.approx(1 - 0.125 / 1.25)


def test_token_values_are_the_score_head_at_every_position(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    values = get_token_values(model, ids)
    assert values.shape == (2, 4)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state  # (2, 4, H)
        expected = model.score(hidden).squeeze(-1)
        pooled = model(ids).logits[:, 0]  # HF pools the last position here (no pad id in the rows)
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(values[:, -1], pooled)


def test_response_log_probs_from_first_response_column_equal_full_and_same_gradients(tiny_model):
    """``response_mask`` (logits only from the first response column on, as TRL's logits_to_keep): the
    masked log-probs, entropies and the gradients of a masked loss equal the full computation's; the
    prompt columns before it are 0."""
    model = copy.deepcopy(tiny_model).eval()
    torch.manual_seed(0)
    input_ids, labels = torch.randint(0, 1000, (2, 9)), torch.randint(0, 1000, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4:8], mask[1, 6:9] = True, True  # first response column: 4

    def run(**kw):
        model.zero_grad()
        out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, **kw)
        masked_mean(out["log_probs"], mask).backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = run()
    kept, kept_grads = run(response_mask=mask)
    torch.testing.assert_close(kept["log_probs"][mask], full["log_probs"][mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(kept["token_entropy"][mask], full["token_entropy"][mask], atol=1e-5, rtol=0)
    assert kept["log_probs"].shape == (2, 9) and torch.all(kept["log_probs"][:, :4] == 0)
    assert torch.all(kept["token_entropy"][:, :4] == 0)
    assert len(kept_grads) == len(full_grads) > 0
    # float32: the sliced and the full LM head sum in another order (CI with 2 threads saw 4.5e-6 on one of
    # 1.6M embedding-gradient entries of size ~0.27); a wrong slice would be off by the whole gradient
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the log-probs against a float64 log-softmax of the model's own logits
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids).logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kept["log_probs"][mask].double(), lp[mask], atol=1e-5, rtol=0)


def test_response_log_probs_without_logits_to_keep_fall_back_to_full():
    """A model whose forward has no ``logits_to_keep`` gets the full computation (same values)."""
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 5)

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.emb(input_ids) @ self.emb.weight.T})()

    torch.manual_seed(0)
    model, ids = Plain(), torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    a = get_response_log_probs(model, ids, ids, response_mask=mask)["log_probs"]
    b = get_response_log_probs(model, ids, ids)["log_probs"]
    torch.testing.assert_close(a, b)


def test_shared_prompt_log_probs_equal_per_row_values_and_gradients(tiny_model, gpt2_tokenizer):
    """Rows sharing a prompt (a GRPO group): the prompt once + its repeated KV cache gives the per-row
    padded computation's log-probs, entropies and gradients of a masked loss; None when nothing repeats."""
    model = copy.deepcopy(tiny_model).eval()
    p = ["User: 1 + 1\nAssistant:", "User: what is 22 + 3?\nAssistant:"]
    batch = tokenize_prompt_and_output([p[0], p[1], p[0], p[1], p[1]],
                                       [" two", " it is 25 ok", " 2 </answer>", " 25", " twenty five"], gpt2_tokenizer)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["response_mask"]

    def run(fn):
        model.zero_grad()
        out = fn()
        masked_mean(out["log_probs"], mask).backward()
        return out, [q.grad.clone() for q in model.parameters() if q.grad is not None]

    shared, g_shared = run(lambda: shared_prompt_log_probs(model, ids, labels, mask, return_token_entropy=True))
    full, g_full = run(lambda: get_response_log_probs(model, ids, labels, return_token_entropy=True))
    torch.testing.assert_close(shared["log_probs"][mask], full["log_probs"][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared["token_entropy"][mask], full["token_entropy"][mask], atol=1e-4, rtol=0)
    assert torch.all(shared["log_probs"][~mask] == 0)
    assert len(g_shared) == len(g_full) > 0
    for a, b in zip(g_shared, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    distinct = tokenize_prompt_and_output(p, [" two", " 25"], gpt2_tokenizer)
    assert shared_prompt_log_probs(model, distinct["input_ids"], distinct["labels"], distinct["response_mask"]) is None


def test_shared_prompt_log_probs_through_a_lora_adapter(tiny_model, gpt2_tokenizer):
    """The PEFT wrapper passes the cache through: same values and adapter gradients as the padded path."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(tiny_model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
    batch = tokenize_prompt_and_output(["Q: 1+1\nA:"] * 3, [" two", " it is 2 ok", " 2"], gpt2_tokenizer)
    mask = batch["response_mask"]

    def run(fn):
        model.zero_grad()
        out = fn()
        masked_mean(out["log_probs"], mask).backward()
        return out, [q.grad.clone() for q in model.parameters() if q.grad is not None]

    shared, g_shared = run(lambda: shared_prompt_log_probs(model, batch["input_ids"], batch["labels"], mask))
    full, g_full = run(lambda: get_response_log_probs(model, batch["input_ids"], batch["labels"]))
    torch.testing.assert_close(shared["log_probs"][mask], full["log_probs"][mask], atol=1e-5, rtol=0)
    assert len(g_shared) == len(g_full) > 0
    for a, b in zip(g_shared, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- LM head path
def _head_calls(monkeypatch) -> list:
    """Record each call of ``lm_head_log_probs`` from alignkit.rl.core (the logits-free head path)."""
    from alignkit.rl import core

    calls, real = [], core.lm_head_log_probs
    monkeypatch.setattr(core, "lm_head_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _f64_reference(model, input_ids, labels, mask, temperature=1.0):
    """log-probs and entropies of ``softmax(logits / T)`` from a float64 copy's full logits, and the float64
    gradients of ``masked_mean(log_probs, mask)`` by parameter name."""
    ref = copy.deepcopy(model).double()
    lp = torch.log_softmax(ref(input_ids).logits / temperature, -1)  # (B, T, V) float64
    log_probs = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    masked_mean(log_probs, mask).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return log_probs.detach(), entropy.detach(), grads


def _grads(model, log_probs, mask) -> dict:
    model.zero_grad()
    masked_mean(log_probs, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches_reference(model, out, mask, reference, entropy=True):
    ref_lp, ref_entropy, ref_grads = reference
    torch.testing.assert_close(out["log_probs"][mask].double(), ref_lp[mask], atol=2e-5, rtol=0)
    if entropy:
        torch.testing.assert_close(out["token_entropy"][mask].double(), ref_entropy[mask], atol=1e-4, rtol=0)
    grads = _grads(model, out["log_probs"], mask)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():  # float32 against float64
        torch.testing.assert_close(grad.double(), ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _lora(model, **kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                      **kw)).eval()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_path_equals_float64_full_logits(tiny_model, monkeypatch, lora, temperature):
    """The head inside lm_head_log_probs (no (B, T, V) logits): log-probs, entropies and gradients of a
    masked loss equal a float64 log-softmax of the full logits divided by the temperature, with and
    without a LoRA adapter on every linear layer below the head; the prompt columns hold 0."""
    model = _lora(tiny_model, target_modules="all-linear") if lora else copy.deepcopy(tiny_model).eval()
    torch.manual_seed(0)
    input_ids, labels = torch.randint(0, 1000, (2, 9)), torch.randint(0, 1000, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:8], mask[1, 5:9] = True, True
    reference = _f64_reference(model, input_ids, labels, mask, temperature)
    calls = _head_calls(monkeypatch)
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, response_mask=mask,
                                 temperature=temperature)
    assert calls == [1] and out["log_probs"].dtype == out["token_entropy"].dtype == torch.float32
    assert torch.all(out["log_probs"][:, :3] == 0) and torch.all(out["token_entropy"][:, :3] == 0)
    _assert_matches_reference(model, out, mask, reference)
    with torch.no_grad():  # the old / reference log-prob passes, no entropy asked
        no_grad = get_response_log_probs(model, input_ids, labels, response_mask=mask, temperature=temperature)
    assert set(no_grad) == {"log_probs"} and calls == [1, 1]
    torch.testing.assert_close(no_grad["log_probs"][mask].double(), reference[0][mask], atol=2e-5, rtol=0)


def test_lora_on_the_lm_head_keeps_the_logits_path(tiny_model, monkeypatch):
    """A LoRA adapter on lm_head (the head is a PEFT layer): the model's own logits are scored, the adapter
    included (float64 reference, gradients into the head's adapter)."""
    model = _lora(tiny_model, target_modules=["q_proj", "lm_head"])
    torch.manual_seed(0)
    input_ids, labels = torch.randint(0, 1000, (2, 7)), torch.randint(0, 1000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, :2] = False
    reference = _f64_reference(model, input_ids, labels, mask, 0.8)
    calls = _head_calls(monkeypatch)
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, response_mask=mask,
                                 temperature=0.8)
    assert calls == []
    assert any("lm_head.lora" in name for name in reference[2])
    _assert_matches_reference(model, out, mask, reference)


def test_rescaled_logits_keep_the_logits_path(monkeypatch):
    """A head whose output the model rescales is not scored alone: by its config field (no head call at
    all) or, without one, by the model's logits differing from the head's output (run again, then never
    tried again). Values are those of the rescaled logits."""
    from alignkit.rl import core

    class Scaled(torch.nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.config, self.emb, self.lm_head = config, torch.nn.Embedding(13, 6), torch.nn.Linear(6, 13)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, logits_to_keep=0):
            hidden = torch.tanh(self.emb(input_ids))[:, -logits_to_keep:]
            return type("Out", (), {"logits": self.lm_head(hidden) * 0.5})()

    torch.manual_seed(0)
    ids, labels = torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5))
    calls = _head_calls(monkeypatch)
    for model in (Scaled(type("Cfg", (), {"logit_scale": 0.5})()), Scaled()):
        forwards = []
        model.register_forward_hook(lambda *_, seen=forwards: seen.append(1))
        for _ in range(2):
            out = get_response_log_probs(model, ids, labels, return_token_entropy=True)
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits.double(), -1)
            forwards.pop()
            torch.testing.assert_close(out["log_probs"].double(), lp.gather(-1, labels[..., None])[..., 0],
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(out["token_entropy"].double(), -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=0)
        # the config field: one forward per call; the unannounced scale: two on the first call, one after
        assert len(forwards) == (2 if model.config is not None else 3)
        assert model.lm_head in core._UNFIT_HEADS or model.config is not None
    assert calls == []


def test_a_model_that_takes_no_logits_to_keep_uses_the_head_path_on_all_positions(monkeypatch):
    """A plain nn.Linear head without logits_to_keep: the head path on every position (float64 reference)."""
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = torch.nn.Embedding(11, 5), torch.nn.Linear(5, 11)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.lm_head(self.emb(input_ids))})()

    torch.manual_seed(0)
    model, ids = Plain(), torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    reference = _f64_reference(model, ids, ids, mask, 1.5)
    calls = _head_calls(monkeypatch)
    out = get_response_log_probs(model, ids, ids, return_token_entropy=True, response_mask=mask, temperature=1.5)
    assert calls == [1]
    torch.testing.assert_close(out["log_probs"].double(), reference[0], atol=1e-6, rtol=0)
    _assert_matches_reference(model, out, mask, reference)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_head_path_equals_float64_full_logits(tiny_model, gpt2_tokenizer, monkeypatch, lora):
    """shared_prompt_log_probs through the head path (prompt once, cache repeated): values, entropies and
    gradients against the float64 full logits of the padded rows, at a temperature."""
    model = _lora(tiny_model, target_modules="all-linear") if lora else copy.deepcopy(tiny_model).eval()
    p = ["User: 1 + 1\nAssistant:", "User: what is 22 + 3?\nAssistant:"]
    batch = tokenize_prompt_and_output([p[0], p[1], p[0], p[1]], [" two", " it is 25 ok", " 2 </answer>", " 25"],
                                       gpt2_tokenizer)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["response_mask"]
    reference = _f64_reference(model, ids, labels, mask, 0.6)
    calls = _head_calls(monkeypatch)
    out = shared_prompt_log_probs(model, ids, labels, mask, return_token_entropy=True, temperature=0.6)
    assert len(calls) == 2  # one per distinct prompt
    assert torch.all(out["log_probs"][~mask] == 0)
    _assert_matches_reference(model, out, mask, reference)


def test_a_head_placed_by_an_accelerate_hook_keeps_the_logits_path(tiny_model, monkeypatch):
    """A head with accelerate's device_map hook (its weight may be offloaded between calls): the logits path."""
    model = copy.deepcopy(tiny_model).eval()
    model.lm_head._hf_hook = object()
    input_ids = torch.randint(0, 1000, (1, 4))
    calls = _head_calls(monkeypatch)
    out = get_response_log_probs(model, input_ids, input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids).logits.double(), -1).gather(-1, input_ids[..., None])[..., 0]
    assert calls == []
    torch.testing.assert_close(out["log_probs"].double(), lp, atol=1e-5, rtol=0)
