"""Loss masks you can see (alignkit.data.masks, alignkit data check --show-rows/--html): assistant spans for a
chat template without {% generation %} tags, the mask refusals, cross-document attention, and a 2-step SFT run
whose labels are -100 exactly outside the assistant turns."""
from __future__ import annotations

import copy
import html
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from alignkit.cli import data as data_cli
from alignkit.config import load_recipe
from alignkit.data import masks
from alignkit.train import sft

# ChatML-like, no {% generation %} tags (as most templates, SmolLM2's included)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 3 * 4?"},
     {"role": "assistant", "content": "12, as 3 fours make twelve."}],
    [{"role": "user", "content": "Translate 'thank you' to Spanish."}, {"role": "assistant", "content": "Gracias."},
     {"role": "user", "content": "And to French?"}, {"role": "assistant", "content": "Merci."}],
]


def _turn(m: dict) -> tuple[str, str]:
    """(head, body) of one rendered turn: the assistant body is what assistant-only loss trains on."""
    return f"<|im_start|>{m['role']}\n", f"{m['content']}<|im_end|>\n"


def expected_text(messages, open_="[[", close="]]") -> str:
    """The conversation as CHATML renders it, assistant turns (content + end of turn) bracketed: by hand."""
    out = []
    for m in messages:
        head, body = _turn(m)
        out.append(head + (f"{open_}{body}{close}" if m["role"] == "assistant" else body))
    return "".join(out)


def expected_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of the hand-rendered text and 1 on tokens inside an assistant body, from character offsets."""
    text, spans = "", []
    for m in messages:
        head, body = _turn(m)
        text += head
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(body)))
        text += body
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_tokenizer):
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, chat_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir, out)
    chat_tokenizer.save_pretrained(out)
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, model_dir, data, train: str = "assistant_only_loss: true", data_extra: str = ""):
    path = tmp_path / "sft.yaml"
    path.write_text(f"stage: sft\nmodel: {{name_or_path: {model_dir}}}\ndata: {{path: {data}{data_extra}}}\n"
                    "train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 256, logging_steps: 1, "
                    "report_to: none, gradient_checkpointing: false, save_strategy: 'no', learning_rate: 1.0e-3, "
                    f"{train}}}\n")
    return path


# ----------------------------------------------------------------------------------------------
# Assistant spans


def test_assistant_mask_equals_the_assistant_tokens(chat_tokenizer):
    assert not masks.has_generation_tags(chat_tokenizer)
    for messages in CONVERSATIONS:
        ids, mask = masks.assistant_mask(chat_tokenizer, messages)
        want_ids, want_mask = expected_mask(chat_tokenizer, messages)
        assert ids == want_ids
        assert mask == want_mask and sum(mask) > 0


def test_assistant_mask_agrees_with_trl_on_the_same_template_with_generation_tags(chat_tokenizer, tmp_path,
                                                                                 chat_model_dir, capsys):
    """The same template with {% generation %} tags: transformers' own assistant mask (what TRL uses then) equals
    alignkit's turn-by-turn mask on the untagged one, and --show-rows (TRL's path) brackets the same text."""
    tagged = copy.deepcopy(chat_tokenizer)
    tagged.chat_template = CHATML.replace("{{ m['content'] }}<|im_end|>\n",
                                          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                                          "<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n"
                                          "{% endif %}")
    assert masks.has_generation_tags(tagged)
    for messages in CONVERSATIONS:
        out = tagged.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert (out["input_ids"], out["assistant_masks"]) == masks.assistant_mask(chat_tokenizer, messages)
    model = tmp_path / "tagged"
    shutil.copytree(chat_model_dir, model)
    tagged.save_pretrained(model)
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    assert data_cli.main(["check", str(_recipe(tmp_path, model, data)), "--show-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert all(expected_text(m) in out for m in CONVERSATIONS)


def test_a_template_that_cannot_be_split_into_turns_is_refused(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)  # the last turn is rendered differently from earlier ones
    tok.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{{ ' (last)' if loop.last else '' }}")
    with pytest.raises(masks.MaskError, match="cannot be split into turns: rendering the first 2 messages with the "
                                              "generation prompt is not a prefix of the whole conversation"):
        masks.assistant_mask(tok, CONVERSATIONS[0])


def test_mask_problems_name_all_zero_and_all_one_rows():
    rows = [masks.ViewRow("row 1", [1, 2, 3], [False, False, False]),
            masks.ViewRow("row 2", [1, 2, 3], [True, True, True]),
            masks.ViewRow("row 3", [1, 2, 3], [False, True, True]),
            masks.ViewRow("row 4", [1, 2, 3], [True, True, True], masked=False)]  # no mask asked: fine
    problems = masks.mask_problems(rows)
    assert len(problems) == 2
    assert "trains on nothing" in problems[0] and problems[0].endswith(": row 1")
    assert "the prompt too" in problems[1] and problems[1].endswith(": row 2")


# ----------------------------------------------------------------------------------------------
# alignkit data check --show-rows / --html


@pytest.mark.parametrize("train", ["assistant_only_loss: true", "completion_only_loss: true"])
def test_show_rows_brackets_exactly_the_assistant_turns(tmp_path, chat_model_dir, capsys, train):
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    page = tmp_path / "rows.html"
    code = data_cli.main(["check", str(_recipe(tmp_path, chat_model_dir, data, train)), "--show-rows", "2",
                          "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0
    shown = out.split("### First 2 rows as the sft trainer sees them (loss tokens between [[ and ]])\n", 1)[1]
    shown, wrote = shown.split("\nwrote ", 1)
    assert wrote.strip() == str(page)
    blocks = re.split(r"--- row \d: \d+ tokens, \d+ with loss ---\n", shown)[1:]
    assert [b.rstrip("\n") for b in blocks[:2]] == [expected_text(m).rstrip("\n") for m in CONVERSATIONS]
    # the HTML page marks the same tokens
    found = re.findall(r'<mark class="loss">(.*?)</mark>', page.read_text(), re.DOTALL)
    marked = [html.unescape(t) for t in found]
    assert marked == [_turn(m)[1] for conv in CONVERSATIONS for m in conv if m["role"] == "assistant"]


def test_show_rows_prompt_completion_rows_bracket_the_completion(tmp_path, chat_model_dir, capsys):
    rows = [{"prompt": "Add 2 and 2.", "completion": "The sum is 4."}]
    recipe = _recipe(tmp_path, chat_model_dir, _jsonl(tmp_path / "pc.jsonl", rows), "max_steps: 2",
                     ', template: "### Q: {prompt}\\n### A: {response}"')
    assert data_cli.main(["check", str(recipe), "--show-rows", "1"]) == 0
    out = capsys.readouterr().out  # the prompt through the template, TRL's EOS after the completion; the
    # template's trailing space merges with the completion's first word (" The"), so it carries loss: shown
    assert "---\n### Q: Add 2 and 2.\n### A:[[ The sum is 4.<|endoftext|>]]\n" in out


def test_show_rows_preference_pairs_as_dpo_tokenizes_them(tmp_path, chat_model_dir, capsys):
    data = _jsonl(tmp_path / "pref.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}])
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"stage: dpo\nmodel: {{name_or_path: {chat_model_dir}}}\ndata: {{path: {data}}}\n"
                      "train: {max_length: 64, report_to: none}\n")
    assert data_cli.main(["check", str(recipe), "--show-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "Capital of France?[[Paris.<|endoftext|>]]" in out  # DPOTrainer adds EOS to plain-text replies
    assert "Capital of France?[[Rome.<|endoftext|>]]" in out
    assert data_cli.main(["check", str(recipe), "data.template=chat", "--show-rows", "1"]) == 0
    out = capsys.readouterr().out
    chat = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert f"{chat}[[Paris.<|im_end|>\n]]" in out and f"{chat}[[Rome.<|im_end|>\n]]" in out


def test_check_refuses_rows_that_train_on_nothing(tmp_path, chat_model_dir, chat_tokenizer, capsys):
    # a transcript without an assistant turn: refused by the loader (as training does) and by the mask builder
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "Anyone there?"}]}]
    code = data_cli.main(["check", str(_recipe(tmp_path, chat_model_dir, _jsonl(tmp_path / "d.jsonl", rows)))])
    assert code == 1 and "d.jsonl line 2: field 'messages': no assistant turn" in capsys.readouterr().err
    with pytest.raises(masks.MaskError, match="training data row 2: no assistant turn, so assistant-only loss "
                                              "would train on nothing"):
        masks.with_assistant_masks(rows, chat_tokenizer)
    # TRL's wrapped packing cuts rows into max_length chunks: a chunk inside a long prompt carries no loss
    long = [{"prompt": "word " * 40 + f"question {i}?", "completion": f"answer {i}."} for i in range(3)]
    recipe = _recipe(tmp_path, chat_model_dir, _jsonl(tmp_path / "long.jsonl", long),
                     "packing: true, packing_strategy: wrapped, max_length: 16")
    recipe.write_text(recipe.read_text().replace("max_length: 256, ", ""))
    assert data_cli.main(["check", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "loss mask: no token carries loss (the row trains on nothing): row 1, row 2" in err


def test_check_refuses_rows_that_train_on_the_prompt_too(tmp_path, chat_model_dir, capsys):
    # the prompt alone renders with a leading marker that the full conversation lacks: TRL's completion mask
    # (prompt = common prefix) then starts at token 0 and the whole row carries loss
    model = tmp_path / "model"
    shutil.copytree(chat_model_dir, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% if add_generation_prompt %}>>{% endif %}" + CHATML
    tok.save_pretrained(model)
    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    code = data_cli.main(["check", str(_recipe(tmp_path, model, data, "completion_only_loss: true",
                                               ", template: chat"))])
    assert code == 1
    err = capsys.readouterr().err
    assert "every token carries loss although a loss mask was asked for (the row trains on the prompt too): row 1" \
        in err


def test_check_refuses_packed_rows_that_attend_across_documents(tmp_path, chat_model_dir, capsys):
    rows = [{"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."} for i in range(12)]
    data = _jsonl(tmp_path / "pc.jsonl", rows)
    recipe = _recipe(tmp_path, chat_model_dir, data, "padding_free: true, max_length: 64",
                     ", packing: alignkit, template: alpaca_sft")
    recipe.write_text(recipe.read_text().replace("max_length: 256, ", ""))
    assert data_cli.main(["check", str(recipe)]) == 1
    assert "packed rows attend across documents: data.packing: alignkit" in capsys.readouterr().err
    # TRL's BFD packing restarts positions per document: fine, and --show-rows marks each document start
    recipe = _recipe(tmp_path, chat_model_dir, data, "packing: true, max_length: 64", ", template: alpaca_sft")
    recipe.write_text(recipe.read_text().replace("max_length: 256, ", ""))
    assert data_cli.main(["check", str(recipe), "--show-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"--- batch 1: \d+ tokens, \d+ with loss, \d+ documents ---", out)
    assert out.count("‖Below is an instruction") >= 1


def test_attention_probe_tells_per_document_kernels_from_one_that_ignores_positions(tiny_model_dir):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from alignkit.models import load_model

    def causal_over_the_row(module, query, key, value, attention_mask, **kwargs):  # ignores position ids
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("row_causal_test", causal_over_the_row)
    for name in ("eager", "sdpa", "sdpa_varlen"):  # PER_DOCUMENT_ATTENTION members that run on CPU
        assert name in masks.PER_DOCUMENT_ATTENTION
        model, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu", attn_implementation=name)
        assert masks.attends_per_document(model.eval()), name
    model, _, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu",
                             attn_implementation="row_causal_test")
    assert not masks.attends_per_document(model.eval())
    problem = masks.cross_document_problem(per_document=True, attn_implementation="row_causal_test",
                                           prepacked=False, probe=lambda: masks.attends_per_document(model))
    assert "'row_causal_test' ignores position_ids and cu_seq_lens" in problem
    assert masks.cross_document_problem(per_document=False, attn_implementation="row_causal_test",
                                        prepacked=True) is None


# ----------------------------------------------------------------------------------------------
# Training


def test_two_step_assistant_only_training_labels_and_loss(tmp_path, chat_model_dir, chat_tokenizer, monkeypatch):
    """The collated batches the trainer got: labels are -100 exactly outside the assistant turns (expected mask
    built from character offsets), and each step's loss equals a float64 hand computation with that mask."""
    from trl import SFTTrainer

    seen = []
    original = SFTTrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double()
        labels = inputs["labels"][:, 1:]
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
        keep = labels != -100
        nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]
        seen.append((inputs["input_ids"].clone(), inputs["labels"].clone(), inputs["attention_mask"].clone(),
                     float((out[0] if return_outputs else out).detach()), float(nll.mean())))
        return out

    monkeypatch.setattr(SFTTrainer, "compute_loss", spy)
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    stage = load_recipe(_recipe(tmp_path, chat_model_dir, data), [f"output_dir={tmp_path / 'out'}"]).stages["sft"]
    assert sft.run(stage, tmp_path / "out", None)["global_step"] == 2
    expected = {tuple(ids): mask for ids, mask in (expected_mask(chat_tokenizer, m) for m in CONVERSATIONS)}
    assert len(seen) == 2
    for input_ids, labels, attention, loss, hand in seen:
        for row in range(input_ids.shape[0]):
            keep = attention[row].bool()
            ids = tuple(input_ids[row][keep].tolist())
            assert ids in expected  # each row is one whole conversation
            assert (labels[row][keep] != -100).int().tolist() == expected[ids]
            assert (labels[row][~keep] == -100).all()
        assert loss == pytest.approx(hand, rel=1e-4)
