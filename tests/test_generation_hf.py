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
from alignkit.generation.hf import HFGenerator

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
