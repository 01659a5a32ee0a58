"""HFGenerator against an independent reference: a plain greedy loop (full forward, no cache,
no padding, argmax), one prompt at a time."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.generation import Generator
from alignkit.generation.base import SamplingParams
from alignkit.generation.hf import ContinuousBatch, HFGenerator

PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "One two three four five six seven eight",
           "Why?"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory):
    # A larger init scale than the default tiny model: its greedy outputs vary token to token,
    # so padding or position mistakes change them.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-varied"), initializer_range=0.5)


@pytest.fixture(scope="module")
def model(varied_dir):
    return AutoModelForCausalLM.from_pretrained(varied_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(varied_dir):
    return AutoTokenizer.from_pretrained(varied_dir)


def reference_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1]  # (V,)
            out.append(int(logits.argmax()))
    return out


@pytest.fixture(scope="module")
def references(model, tok):
    return {p: reference_greedy(model, tok, p, 8) for p in PROMPTS}


def test_batched_left_padded_greedy_matches_one_at_a_time(model, tok, references):
    gen = HFGenerator(model, tok, batch_size=2)
    assert isinstance(gen, Generator)
    side = tok.padding_side
    out = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    assert tok.padding_side == side and tok.pad_token is None  # caller's tokenizer untouched
    assert len(out) == len(PROMPTS)
    for prompt, c in zip(PROMPTS, out):
        ref = references[prompt]
        assert 50256 not in ref  # this model never emits EOS in 8 steps: all runs hit the length limit
        assert c.token_ids == ref, prompt
        assert c.text == tok.decode(ref)
        assert c.finish_reason == "length"
        assert c.prompt_tokens == len(tok(prompt)["input_ids"])
    assert len(set(references[PROMPTS[1]])) > 2  # outputs vary (the check above is not trivial)
    assert gen.stats.requests == len(PROMPTS)
    assert gen.stats.generated_tokens == 8 * len(PROMPTS)
    assert gen.stats.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS)


def test_max_new_tokens_honoured(model, tok, references):
    out = HFGenerator(model, tok, batch_size=8).generate(PROMPTS[:3], SamplingParams(max_new_tokens=3))
    for prompt, c in zip(PROMPTS[:3], out):
        assert c.token_ids == references[prompt][:3] and c.finish_reason == "length"


@pytest.mark.parametrize("distinct_pad", [False, True])
def test_stop_string_cuts_text_and_tokens(model, tok, references, distinct_pad):
    ref = references[PROMPTS[1]]
    ref_text = tok.decode(ref)
    stop = tok.decode(ref[3]).strip() or tok.decode(ref[3])  # a piece of the 4th generated token
    other = next(p for p in PROMPTS if stop not in tok.decode(references[p]))
    tokenizer = tok
    if distinct_pad:  # rows that finish early are padded with a token that is not EOS
        tokenizer = copy.deepcopy(tok)
        tokenizer.pad_token = "!"
    out = HFGenerator(model, tokenizer, batch_size=2).generate(
        [PROMPTS[1], other], SamplingParams(max_new_tokens=8, stop=[stop]))
    expected = ref_text[:ref_text.find(stop)]
    assert out[0].text == expected and stop not in out[0].text
    assert out[0].finish_reason == "stop"
    assert expected.startswith(tok.decode(out[0].token_ids))
    assert out[0].token_ids == ref[:len(out[0].token_ids)] and len(out[0].token_ids) <= 3
    assert out[1].token_ids == references[other] and out[1].finish_reason == "length"


def _with_eos(model, eos_id: int):
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = eos_id
    return m


def test_eos_equal_to_pad_cuts_at_first_eos(model, tok, references):
    # Make the 3rd greedy token of one prompt the EOS (the tokenizer has no pad: pad == eos).
    ref = references[PROMPTS[3]]
    eos = ref[2]
    m = _with_eos(model, eos)
    out = HFGenerator(m, tok, batch_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=8))
    for prompt, c in zip(PROMPTS, out):
        r = references[prompt]
        if eos in r:
            assert c.token_ids == r[:r.index(eos)] and c.finish_reason == "stop"
        else:
            assert c.token_ids == r and c.finish_reason == "length"
    assert out[3].token_ids == ref[:ref.index(eos)]


def test_min_new_tokens_suppresses_eos(model, tok, references):
    ref = references[PROMPTS[3]]
    eos = ref[0]  # EOS would end the completion at once
    m = _with_eos(model, eos)
    gen = HFGenerator(m, tok)
    assert gen.generate([PROMPTS[3]], SamplingParams(max_new_tokens=6))[0].token_ids == []
    c = gen.generate([PROMPTS[3]], SamplingParams(max_new_tokens=6, min_new_tokens=4))[0]
    assert len(c.token_ids) >= 4 and eos not in c.token_ids[:4]


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, tok):
    gen = HFGenerator(model, tok, batch_size=3)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    state = torch.get_rng_state()
    a = gen.generate(PROMPTS, params)
    assert torch.equal(state, torch.get_rng_state())
    b = gen.generate(PROMPTS, params)
    c = gen.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0, seed=12))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Repeated prompts (a GRPO group) get different samples within one call.
    group = gen.generate([PROMPTS[0]] * 4, params)
    assert len({tuple(x.token_ids) for x in group}) > 1


def test_tiny_top_p_sampling_equals_greedy(model, tok, references):
    # top_p -> 0 keeps only the most likely token: sampling must reduce to argmax.
    out = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.7,
                                                                   top_p=1e-6, seed=0))
    assert [c.token_ids for c in out] == [references[p] for p in PROMPTS]


def test_chat_applies_template(model, tok):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = CHAT_TEMPLATE
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    by_hand = "<system>Be brief.\n<user>Hi\n<assistant>"
    gen = HFGenerator(model, tokenizer)
    chat = gen.chat([conv], SamplingParams(max_new_tokens=5))[0]
    assert chat.token_ids == reference_greedy(model, tok, by_hand, 5)
    assert chat.prompt_tokens == len(tok(by_hand)["input_ids"])
    with pytest.raises(ValueError, match="chat_template"):
        HFGenerator(model, tok).chat([conv], SamplingParams(max_new_tokens=2))


def test_update_weights(model, tok, varied_dir, references):
    gen = HFGenerator(model, tok)
    gen.update_weights(model)  # same module: no-op
    other = build_tiny_llama(varied_dir.parent / "other", seed=1, initializer_range=0.5)
    other_model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    target = copy.deepcopy(model)
    gen = HFGenerator(target, tok)
    gen.update_weights(other_model)
    got = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5))[0].token_ids
    assert got == reference_greedy(other_model, tok, PROMPTS[1], 5)
    assert got != references[PROMPTS[1]][:5]
    with pytest.raises(ValueError, match="update_weights"):
        gen.update_weights(torch.nn.Linear(2, 2))


def test_bad_input(model, tok):
    gen = HFGenerator(model, tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(["x", ""], SamplingParams(max_new_tokens=2))
    with pytest.raises(TypeError):
        gen.generate("a single string", SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="batch_size"):
        HFGenerator(model, tok, batch_size=0)


def test_restores_training_mode(model, tok):
    m = copy.deepcopy(model).train()
    HFGenerator(m, tok).generate(["x"], SamplingParams(max_new_tokens=2))
    assert m.training


def test_make_generator_hf(varied_dir, model, tok, references):
    from alignkit.generation import make_generator

    gen = make_generator(f"hf:{varied_dir}", batch_size=2, device="cpu", dtype="float32")
    assert isinstance(gen, HFGenerator) and gen.name == f"hf:{varied_dir}" and gen.batch_size == 2
    out = gen.generate(PROMPTS[:3], SamplingParams(max_new_tokens=8))
    assert [c.token_ids for c in out] == [references[p] for p in PROMPTS[:3]]
    given = make_generator("hf:mine", model=model, tokenizer=tok)
    assert given.model is model and given.name == "hf:mine"
    with pytest.raises(ValueError, match="tokenizer"):
        make_generator("hf:mine", model=model)
    with pytest.raises(ValueError, match="unknown generator spec 'gpt-4'"):
        make_generator("gpt-4")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_chat_batched_equals_single_and_eos_is_pad():
    models = pytest.importorskip("alignkit.models")
    source = models.resolve_model(models.DEFAULT_MODEL)
    m, tokenizer, _ = models.load_model(source.path, dtype=torch.float32, device="cpu", for_generation=True)
    assert tokenizer.pad_token_id == m.generation_config.eos_token_id  # the case the EOS cut must handle
    convs = [[{"role": "user", "content": "Say hi."}],
             [{"role": "user", "content": "What is 2 + 3? Answer with a number only."}],
             [{"role": "user", "content": "Write a long story about a dragon."}]]
    params = SamplingParams(max_new_tokens=40)
    batched = HFGenerator(m, tokenizer, batch_size=3).chat(convs, params)
    single = [HFGenerator(m, tokenizer, batch_size=1).chat([c], params)[0] for c in convs]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert "5" in batched[1].text and batched[1].finish_reason == "stop" and "<|im_end|>" not in batched[1].text
    assert batched[2].finish_reason == "length" and batched[2].num_tokens == 40


# ------------------------------------------------------------------ continuous batching
def _rows_per_forward(model):
    """A list that collects the batch size of every forward of ``model``'s decoder (and the hook handle)."""
    seen: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    return seen, handle


def test_continuous_refills_slots_and_drops_finished_rows(model, tok, references):
    # EOS = the 2nd greedy token of one prompt: that row ends after 1 token, its slot takes the next prompt.
    eos = references[PROMPTS[1]][1]
    m = _with_eos(model, eos)
    expected = {p: (references[p][:references[p].index(eos)] if eos in references[p] else references[p])
                for p in PROMPTS}
    assert len({len(v) for v in expected.values()}) > 1  # uneven lengths: the check below is not trivial
    static = HFGenerator(m, tok, batch_size=2, continuous=False).generate(PROMPTS, SamplingParams(max_new_tokens=8))
    seen, handle = _rows_per_forward(m)
    try:
        out = HFGenerator(m, tok, batch_size=2).generate(PROMPTS, SamplingParams(max_new_tokens=8))
    finally:
        handle.remove()
    for prompt, c, s in zip(PROMPTS, out, static):
        assert c.token_ids == expected[prompt] == s.token_ids, prompt
        assert c.text == tok.decode(expected[prompt]) == s.text
        assert c.finish_reason == ("stop" if eos in references[prompt] else "length") == s.finish_reason
    assert max(seen) <= 2  # never more rows than slots
    # Rows fed to forwards: one per prompt in its prefill (which picks its 1st token), then one per further
    # token it picks (its EOS included); a finished row is never fed again.
    steps = {p: len(expected[p]) if eos in references[p] else len(expected[p]) - 1 for p in PROMPTS}
    assert sum(seen) == len(PROMPTS) + sum(steps.values())
    assert seen[-1] == 1  # the last row decodes alone: finished rows left the batch


def test_continuous_shared_prefix_prefilled_once(model, tok):
    prompts = ["The quick brown fox jumps over the lazy dog and then",
               "The quick brown fox jumps over the lazy dog but",
               "The quick brown fox jumps over a fence"]
    refs = [reference_greedy(model, tok, p, 6) for p in prompts]
    seen = []
    gen = HFGenerator(model, tok, batch_size=2)
    orig = ContinuousBatch._prefix

    def spy(self, encoded):
        out = orig(self, encoded)
        seen.append(out[0])
        return out

    ContinuousBatch._prefix = spy
    try:
        out = gen.generate(prompts, SamplingParams(max_new_tokens=6))
        unshared = HFGenerator(model, tok, batch_size=2, share_prefix=False).generate(prompts,
                                                                                    SamplingParams(max_new_tokens=6))
    finally:
        ContinuousBatch._prefix = orig
    ids = [tok(p)["input_ids"] for p in prompts]
    common = next(k for k in range(len(ids[2])) if len({tuple(i[:k + 1]) for i in ids}) > 1)
    assert seen == [common, 0] and common >= 5
    assert [c.token_ids for c in out] == refs == [c.token_ids for c in unshared]


def test_continuous_stop_string_ends_row_early(model, tok, references):
    ref = references[PROMPTS[1]]
    ref_text = tok.decode(ref)
    stop = tok.decode(ref[2]).strip() or tok.decode(ref[2])  # a piece of the 3rd generated token
    params = SamplingParams(max_new_tokens=8, stop=[stop])
    seen, handle = _rows_per_forward(model)
    try:
        out = HFGenerator(model, tok, batch_size=2).generate([PROMPTS[1]], params)[0]
    finally:
        handle.remove()
    static = HFGenerator(model, tok, batch_size=2, continuous=False).generate([PROMPTS[1]], params)[0]
    assert out.text == ref_text[:ref_text.find(stop)] == static.text
    assert out.token_ids == static.token_ids and out.finish_reason == "stop" == static.finish_reason
    assert len(seen) == 3  # prefill + 2 decode steps: the row left when its text showed the stop string


def test_continuous_min_new_tokens_and_length(model, tok, references):
    eos = references[PROMPTS[3]][0]
    m = _with_eos(model, eos)
    params = SamplingParams(max_new_tokens=5, min_new_tokens=3)
    cont = HFGenerator(m, tok, batch_size=2).generate(PROMPTS, params)
    static = HFGenerator(m, tok, batch_size=2, continuous=False).generate(PROMPTS, params)
    assert [c.token_ids for c in cont] == [c.token_ids for c in static]
    assert [c.finish_reason for c in cont] == [c.finish_reason for c in static]
    assert all(3 <= c.num_tokens <= 5 or c.finish_reason == "stop" for c in cont)
    assert eos not in cont[3].token_ids[:3]


def test_sliding_window_model_uses_static_path(tmp_path, tok):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    m = MistralForCausalLM(cfg).eval()
    called = []
    orig = HFGenerator._generate_static
    gen = HFGenerator(m, tok, batch_size=2)
    gen._generate_static = lambda enc, params, on_result=None: called.append(1) or orig(gen, enc, params, on_result)
    out = gen.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert called and [c.token_ids for c in out] == [reference_greedy(m, tok, p, 3) for p in PROMPTS[:2]]


@pytest.mark.parametrize("continuous", [True, False])
def test_on_result_reports_each_completion_once_as_it_finishes(tiny_model, gpt2_tokenizer, continuous):
    """on_result(i, completion): every prompt once, the same completion generate returns; on the continuous
    path a short row is reported before the batch's longest one has finished."""
    gen = HFGenerator(tiny_model, gpt2_tokenizer, batch_size=2, continuous=continuous)
    prompts = ["a b c", "d", "e f", "g h i j"]
    caps = SamplingParams(max_new_tokens=6, temperature=0.0)
    seen = []
    out = gen.generate(prompts, caps, on_result=lambda i, c: seen.append((i, c)))
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    assert all(out[i] is c for i, c in seen)
