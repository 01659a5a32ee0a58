"""alignkit.losses.lm_head_log_probs against a float64 log_softmax reference, TRL's chunked kernel and gradcheck."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from alignkit.losses import lm_head_log_probs


def _inputs(n=37, h=16, v=101, *, ignore_every=0, bias=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)  # (N, H)
    weight = torch.randn(v, h, generator=gen) * 0.5  # (V, H)
    b = torch.randn(v, generator=gen) if bias else None  # (V,)
    labels = torch.randint(0, v, (n,), generator=gen)  # (N,)
    if ignore_every:
        labels[::ignore_every] = -100
    upstream = torch.randn(n, generator=gen)  # d loss / d logp, like advantages
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    return (*leaves, labels, upstream)


def _float64_reference(hidden, weight, bias, labels, upstream, temperature=1.0):
    """log_softmax of ``hidden.double() @ W.double().T (+ b)``, 0 at -100, and its autograd gradients."""
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)  # (N, V)
    mask = labels != -100
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    logp = logp * mask
    grads = torch.autograd.grad(logp, leaves, upstream.double())
    return logp.detach(), grads


@pytest.mark.parametrize(("chunk_tokens", "chunk_vocab"), [(None, None), (8, 30), (1, 101), (5, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_float64_reference(chunk_tokens, chunk_vocab, temperature):
    # N = 37 and V = 101 divide none of the chunk sizes; every 5th label is the ignore index
    hidden, weight, bias, labels, upstream = _inputs(ignore_every=5, bias=True)
    got = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=chunk_tokens,
                            chunk_vocab=chunk_vocab, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    grads = torch.autograd.grad(got, (hidden, weight, bias), upstream)
    ref, ref_grads = _float64_reference(hidden, weight, bias, labels, upstream, temperature)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert (got[labels == -100] == 0).all()
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_equals_float64_reference_and_log_probs_are_unchanged(temperature):
    hidden, weight, bias, labels, _ = _inputs(ignore_every=5, bias=True, seed=2)
    logps, entropy = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=8, chunk_vocab=30,
                                       temperature=temperature, return_entropy=True)
    logits = (hidden.double() @ weight.double().T + bias.double()) / temperature  # (N, V)
    logp_all = torch.log_softmax(logits, -1)
    expected = -(logp_all.exp() * logp_all).sum(-1) * (labels != -100)  # H = -sum p log p, 0 where ignored
    torch.testing.assert_close(entropy.double(), expected.detach(), atol=1e-5, rtol=0)
    assert not entropy.requires_grad and entropy.shape == labels.shape
    plain = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=8, chunk_vocab=30,
                              temperature=temperature)
    torch.testing.assert_close(logps, plain, atol=0, rtol=0)


def test_ignored_positions_get_no_gradient_and_leading_dims_are_kept():
    hidden, weight, _, labels, upstream = _inputs(n=24, ignore_every=3)
    got = lm_head_log_probs(hidden.view(2, 12, -1), weight, labels.view(2, 12), chunk_tokens=5, chunk_vocab=16)
    assert got.shape == (2, 12)
    grad_h, = torch.autograd.grad((got * upstream.view(2, 12)).sum(), hidden)
    assert (grad_h[labels == -100] == 0).all() and (grad_h[labels != -100] != 0).any()


def test_all_ignored_is_zero_with_zero_gradient():
    hidden, weight, _, labels, _ = _inputs(n=6)
    labels[:] = -100
    got = lm_head_log_probs(hidden, weight, labels)
    grad_h, grad_w = torch.autograd.grad(got.sum(), (hidden, weight))
    assert (got == 0).all() and (grad_h == 0).all() and (grad_w == 0).all()


def test_bf16_inputs_accumulate_in_float32():
    # the bf16 values are exact in float32, so the values keep the float32 tolerance (1e-5) against the float64
    # reference of the same bf16 numbers; the gradients come back in bf16: one bf16 rounding (2^-8 relative)
    hidden, weight, _, labels, upstream = _inputs(ignore_every=4, dtype=torch.bfloat16)
    got = lm_head_log_probs(hidden, weight, labels, chunk_tokens=8, chunk_vocab=30, temperature=0.9)
    grads = torch.autograd.grad(got, (hidden, weight), upstream)
    ref, ref_grads = _float64_reference(hidden, weight, None, labels, upstream, temperature=0.9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.double(), theirs, atol=1e-3, rtol=8e-3)


def test_autocast_keeps_float32_tiles():
    hidden, weight, _, labels, upstream = _inputs(ignore_every=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_head_log_probs(hidden, weight, labels, chunk_tokens=8, chunk_vocab=30)
    grads = torch.autograd.grad(got, (hidden, weight), upstream)
    ref, ref_grads = _float64_reference(hidden, weight, None, labels, upstream)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    hidden, weight, bias, labels, _ = _inputs(n=7, h=3, v=11, ignore_every=3, bias=True, dtype=torch.float64)

    def fn(h, w, b):
        return lm_head_log_probs(h, w, labels, bias=b, chunk_tokens=3, chunk_vocab=4, temperature=0.8)

    assert fn(hidden, weight, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_equals_trl_chunked_logprob_kernel(temperature):
    # TRL 1.16's ChunkedLogProbFunction, called as add_fused_lm_head calls it off Triton (every position scored,
    # labels clamped, ignored positions zeroed afterwards); its vocab tile (7) differs from ours (30)
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight, bias, labels, upstream = _inputs(n=29, ignore_every=6, bias=True, seed=4)
    ours = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=8, chunk_vocab=30,
                             temperature=temperature)
    ours_grads = torch.autograd.grad(ours, (hidden, weight, bias), upstream)
    theirs = ChunkedLogProbFunction.apply(hidden, weight, bias, labels.clamp(min=0), temperature, 7, None, 1.0,
                                          ("log_probs",))[0].masked_fill(labels == -100, 0)
    theirs_grads = torch.autograd.grad(theirs, (hidden, weight, bias), upstream)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # entropy: TRL's optional "entropy" output of the same kernel
    _, ours_entropy = lm_head_log_probs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        return_entropy=True)
    with torch.no_grad():
        trl_entropy = ChunkedLogProbFunction.apply(hidden, weight, bias, labels.clamp(min=0), temperature, 7, None,
                                                   1.0, ("entropy",))[1].masked_fill(labels == -100, 0)
    torch.testing.assert_close(ours_entropy, trl_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("chunk_tokens", "chunk_vocab"), [(None, None), (8, 30), (5, 7), (1, 1)])
def test_top1_equals_float64_argmax(chunk_tokens, chunk_vocab):
    # half the labels are set to the float64 argmax (so both outcomes occur), every 5th is ignored
    hidden, weight, bias, labels, _ = _inputs(ignore_every=5, bias=True, seed=5)
    logits = hidden.double() @ weight.double().T + bias.double()  # (N, V)
    labels[::2] = torch.where(labels[::2] == -100, labels[::2], logits.argmax(-1)[::2])
    logps, entropy, top1 = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=chunk_tokens,
                                             chunk_vocab=chunk_vocab, return_entropy=True, return_top1=True)
    expected = (logits.argmax(-1) == labels) & (labels != -100)
    assert top1.dtype == torch.bool and torch.equal(top1, expected) and 0 < int(top1.sum()) < len(labels)
    # the pair of outputs without top1 is unchanged, and top1 alone comes back second
    plain, plain_entropy = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_tokens=chunk_tokens,
                                             chunk_vocab=chunk_vocab, return_entropy=True)
    assert torch.equal(logps, plain) and torch.equal(entropy, plain_entropy)
    _, alone = lm_head_log_probs(hidden, weight, labels, bias=bias, return_top1=True)
    assert torch.equal(alone, expected)


@pytest.mark.parametrize("chunk_vocab", [3, 8])
def test_top1_ties_count_only_the_first_maximum(chunk_vocab):
    # vocabulary rows 2 and 5 are the same vector, far larger than the rest: tied maxima; with chunk_vocab=3
    # they fall in different tiles, with 8 in the same one. torch.argmax picks 2, so only label 2 is top-1
    hidden = torch.ones(4, 3)
    weight = torch.full((8, 3), -1.0)
    weight[2] = weight[5] = torch.tensor([2.0, 2.0, 2.0])
    labels = torch.tensor([2, 5, 0, -100])
    _, top1 = lm_head_log_probs(hidden, weight, labels, chunk_vocab=chunk_vocab, return_top1=True)
    assert (hidden @ weight.T).argmax(-1).tolist() == [2, 2, 2, 2]
    assert top1.tolist() == [True, False, False, False]


def test_top1_equals_trl_is_top1():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight, bias, labels, _ = _inputs(n=29, ignore_every=6, bias=True, seed=6)
    labels[1::3] = torch.where(labels[1::3] == -100, labels[1::3],
                               (hidden @ weight.T + bias).argmax(-1)[1::3])
    _, ours = lm_head_log_probs(hidden, weight, labels, bias=bias, chunk_vocab=30, return_top1=True)
    with torch.no_grad():
        theirs = ChunkedLogProbFunction.apply(hidden, weight, bias, labels.clamp(min=0), 1.0, 7, None, 1.0,
                                              ("is_top1",))[4] & (labels != -100)
    assert torch.equal(ours, theirs) and int(theirs.sum()) > 0


def test_forward_and_backward_never_hold_the_logits():
    n, v = 512, 4096
    hidden, weight, _, labels, upstream = _inputs(n=n, h=8, v=v)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = lm_head_log_probs(hidden, weight, labels, chunk_tokens=64, chunk_vocab=512)
        torch.autograd.grad(got, (hidden, weight), upstream)
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    logits_bytes = n * v * 4  # 8 MiB; one tile is 128 KiB, grad_weight 128 KiB
    assert 0 < peak < logits_bytes / 8


def test_errors():
    hidden, weight, _, labels, _ = _inputs(n=4, h=3, v=5)
    with pytest.raises(ValueError, match="must agree"):
        lm_head_log_probs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="must agree"):
        lm_head_log_probs(hidden, weight.T, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        lm_head_log_probs(hidden, weight, torch.tensor([0, 1, 5, -100]))
    with pytest.raises(ValueError, match="temperature"):
        lm_head_log_probs(hidden, weight, labels, temperature=0.0)
