"""alignkit.attention: per-document SDPA for padding-free rows equals a float64 per-document reference
and transformers' ``sdpa`` with its block-diagonal mask; other inputs fall through to plain SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.attention import VARLEN_SDPA, document_bounds, register_varlen_sdpa


def test_document_bounds_from_position_ids_and_cu_seq_lens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert document_bounds(9, position_ids=pos) == [0, 3, 5, 9]
    assert document_bounds(9, cu_seq_lens=torch.tensor([0, 3, 5, 9], dtype=torch.int32)) == [0, 3, 5, 9]
    assert document_bounds(4, position_ids=torch.arange(4)[None]) == [0, 4]  # one document
    assert document_bounds(9, position_ids=torch.zeros(2, 9, dtype=torch.long)) is None  # several rows
    assert document_bounds(9, cu_seq_lens=torch.tensor([0, 3, 8])) is None  # does not cover the row


def _models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    register_varlen_sdpa()
    kw = {"dtype": torch.float64}
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", **kw).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", **kw).eval()
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=VARLEN_SDPA, **kw).eval()
    return ref, sdpa, varlen


def test_packed_row_equals_each_document_alone(tiny_model_dir):
    """Reference: each document run alone (float64 SDPA; eager softmaxes in float32, so it is only
    checked to 1e-6); the packed row must give the same logits."""
    ref, sdpa, varlen = _models(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 1000, (n,), generator=g) for n in (7, 3, 11, 1, 5)]
    flat = torch.cat(docs)[None]  # (1, N)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]  # (1, N)
    with torch.no_grad():
        alone = torch.cat([sdpa(input_ids=d[None]).logits[0] for d in docs])  # (N, V)
        alone_eager = torch.cat([ref(input_ids=d[None]).logits[0] for d in docs])  # (N, V)
        got = varlen(input_ids=flat, position_ids=pos, use_cache=False).logits[0]  # (N, V)
        # transformers builds the block-diagonal mask only without a cache (training)
        masked = sdpa(input_ids=flat, position_ids=pos, use_cache=False).logits[0]
        cross = varlen(input_ids=flat).logits[0]  # no restart: one causal sequence
    torch.testing.assert_close(got, alone, atol=1e-10, rtol=0)
    torch.testing.assert_close(masked, alone, atol=1e-10, rtol=0)
    torch.testing.assert_close(got, alone_eager, atol=1e-6, rtol=0)
    assert (cross[len(docs[0]):] - alone[len(docs[0]):]).abs().max() > 1e-4  # the split really matters


def test_trl_cu_seq_lens_and_gradients_match(tiny_model_dir):
    """With TRL's ``cu_seq_lens_q`` kwargs the loss and the gradients equal sdpa with the block mask."""
    _, sdpa, varlen = _models(tiny_model_dir)
    lens = [6, 9, 4]
    ids = torch.randint(0, 1000, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 6, 15, 19], dtype=torch.int32)
    labels = ids.clone()
    labels[pos == 0] = -100
    loss_a = varlen(input_ids=ids, position_ids=pos, labels=labels, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=9, max_length_k=9, use_cache=False).loss
    loss_b = sdpa(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
    loss_a.backward()
    loss_b.backward()
    # transformers' loss upcasts logits with .float(): float32 precision from here on
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for (name, pa), pb in zip(varlen.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_padded_batches_and_generation_fall_through(tiny_model_dir):
    """A left-padded batch (mask) and cached greedy decoding give what plain sdpa gives."""
    from transformers import AutoTokenizer

    _, sdpa, varlen = _models(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    enc = tok(["hello there, how are", "a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(varlen(**enc).logits, sdpa(**enc).logits, atol=1e-10, rtol=0)
        out_a = varlen.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        out_b = sdpa.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out_a, out_b)


def test_load_model_registers_the_name(tiny_model_dir):
    from alignkit.models import load_model

    model, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu", attn_implementation=VARLEN_SDPA)
    assert model.config._attn_implementation == VARLEN_SDPA
    x = torch.arange(10)[None]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        logits = model(input_ids=x, position_ids=pos).logits  # (1, 10, V)
        alone = model(input_ids=x[:, 4:7]).logits  # the second document on its own
    torch.testing.assert_close(logits[:, 4:7], alone, atol=1e-5, rtol=0)


def test_matches_plain_sdpa_on_one_document():
    """One document: the function defers to transformers' SDPA; checked against softmax(QK^T/sqrt(d) + causal)V
    written out in float64 (grouped-query heads repeated by hand)."""
    from types import SimpleNamespace

    from alignkit.attention import varlen_sdpa_attention

    module = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=2)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out, _ = varlen_sdpa_attention(module, q, k, v, None, position_ids=torch.arange(5)[None])
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5 + torch.full((5, 5), float("-inf")).triu(1)
    expected = (F.softmax(scores, -1) @ vv).transpose(1, 2)  # (1, 5, 4, 8)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_shared_prefix_equals_the_document_with_its_prefix_alone(tiny_model_dir):
    """``shared_prefix_lens``: documents that read the first k tokens of the document before them give the
    float64 logits, and the gradients of a loss on them, that each gets run alone with those k tokens in front."""
    _, sdpa, varlen = _models(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    first, second, third, fourth = (torch.randint(0, 1000, (n,), generator=g) for n in (9, 4, 6, 2))
    k2, k4 = 5, 3  # the second reads first[:5]; the third stands alone; the fourth reads third[:3]
    flat = torch.cat([first, second, third, fourth])[None]  # (1, 21)
    pos = torch.cat([torch.arange(9), torch.arange(k2, k2 + 4), torch.arange(6), torch.arange(k4, k4 + 2)])[None]
    cu = torch.tensor([0, 9, 13, 19, 21], dtype=torch.int32)
    kw = {"position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 9, "max_length_k": 9,
          "shared_prefix_lens": torch.tensor([0, k2, 0, k4]), "use_cache": False}
    got = varlen(input_ids=flat, **kw).logits[0]  # (21, V)
    alone = [sdpa(input_ids=first[None]).logits[0],
             sdpa(input_ids=torch.cat([first[:k2], second])[None]).logits[0, k2:],
             sdpa(input_ids=third[None]).logits[0],
             sdpa(input_ids=torch.cat([third[:k4], fourth])[None]).logits[0, k4:]]
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-10, rtol=0)
    weights = torch.linspace(-1, 1, got.shape[-1], dtype=torch.float64)  # a loss that reads every logit
    grads = []
    for model, loss in ((varlen, lambda: (got * weights).sum()), (sdpa, lambda: (torch.cat(alone) * weights).sum())):
        model.zero_grad()
        loss().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:  # Llama's RMSNorm runs in float32: a prefix token's two gradient sums round apart
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        ignored = varlen(input_ids=flat, **{**kw, "shared_prefix_lens": None}).logits[0]
    assert (ignored[9:13] - got[9:13]).abs().max() > 1e-4  # the prefix really changes the values


def test_shared_prefix_lens_are_checked_and_probed(tiny_model_dir):
    import pytest

    from alignkit.attention import honours_shared_prefix, prefix_causal_mask

    _, sdpa, varlen = _models(tiny_model_dir)
    assert prefix_causal_mask(2, 3).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    ids, cu = torch.arange(1, 10)[None], torch.tensor([0, 5, 7, 9], dtype=torch.int32)
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 1, 2]])
    # longer than the document before; on the first; not one per document; a prefix of a document with a prefix
    for bad in ([0, 6, 0], [1, 2, 0], [0, 2], [0, 2, 1]):
        with pytest.raises(ValueError, match="shared_prefix_lens"), torch.no_grad():
            varlen(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                   max_length_k=5, shared_prefix_lens=torch.tensor(bad), use_cache=False)
    assert honours_shared_prefix(varlen)
    assert not honours_shared_prefix(sdpa)  # plain sdpa ignores the keyword (and reads no cu_seq_lens)


def test_shared_prefix_probe_runs_in_eval_mode_and_restores_the_mode(tmp_path):
    # with heavy dropout in train mode the two forwards of the probe would differ by chance; the probe runs in
    # eval mode and gives the model back in the mode it came in
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from alignkit.attention import VARLEN_SDPA, honours_shared_prefix, register_varlen_sdpa

    register_varlen_sdpa()
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "m", attention_dropout=0.9),
                                                 attn_implementation=VARLEN_SDPA).train()
    with torch.no_grad():  # dropout is live in train mode: the same input gives other logits
        ids = torch.arange(1, 8)[None]
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert honours_shared_prefix(model) and model.training
    assert honours_shared_prefix(model.eval()) and not model.training
