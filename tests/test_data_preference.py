"""alignkit.data.preference: formats, auto-detection, column mapping, errors, TRL dataset compatibility."""
from __future__ import annotations

import json
import logging

import pytest

from alignkit.data.io import DataError
from alignkit.data.preference import (
    PreferencePair,
    load_preference_rows,
    parse_hh_transcript,
    to_trl_dataset,
)
from alignkit.resources import ROOT as RESOURCES

EXAMPLES = RESOURCES / "examples"
# A tiny chat template; tests render its output by hand to compare with TRL's.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def m(role, content):
    return {"role": role, "content": content}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(RESOURCES / "tokenizers" / "gpt2")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_standard_round_trip_and_detection(tmp_path, caplog):
    rows = [{"prompt": "p1", "chosen": "c1", "rejected": "r1", "extra": 5},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="alignkit.data.preference"):
        pairs = load_preference_rows(path)
    assert pairs == [PreferencePair("p1", "c1", "r1", str(path), 1), PreferencePair("p2", "c2", "r2", str(path), 2)]
    assert pairs.format == "prompt_chosen_rejected" and pairs.rows_read == 2
    assert "detected preference format 'prompt_chosen_rejected'" in caplog.text


def test_conversational_implicit_prompt_split_like_trl(tmp_path):
    chosen = [m("user", "Hi"), m("assistant", "Hello"), m("user", "Joke?"), m("assistant", "Knock knock.")]
    rejected = chosen[:3] + [m("assistant", "No.")]
    pairs = load_preference_rows(_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert pairs.format == "conversational"
    assert pairs[0].prompt == chosen[:3]
    assert pairs[0].chosen == [m("assistant", "Knock knock.")] and pairs[0].rejected == [m("assistant", "No.")]


def test_conversational_explicit_and_string_prompt(tmp_path):
    rows = [{"prompt": [m("system", "Be terse."), m("user", "2+2?")], "chosen": [m("assistant", "4")],
             "rejected": [m("assistant", "5")]},
            {"prompt": "3+3?", "chosen": [m("assistant", "6")], "rejected": [m("assistant", "7")]}]
    pairs = load_preference_rows(_jsonl(tmp_path / "d.jsonl", rows))
    assert pairs[0].prompt == rows[0]["prompt"]
    assert pairs[1].prompt == [m("user", "3+3?")] and pairs[1].chosen == [m("assistant", "6")]


def test_parse_hh_transcript():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye, take care."
    assert parse_hh_transcript(text) == [m("user", "Hi there"), m("assistant", "Hello!"), m("user", "Bye"),
                                         m("assistant", "Bye, take care.")]


def test_hh_single_turn_strings_multi_turn_dropped():
    pairs = load_preference_rows(EXAMPLES / "hh_sample.jsonl")
    assert pairs.format == "hh" and pairs.rows_read == 4
    assert [p.line for p in pairs] == [1, 2, 4]
    assert pairs[0].prompt == "How do I boil an egg?" and pairs[0].rejected == "Just microwave it."
    assert pairs[0].chosen == "Put it in boiling water for about 9 minutes, then cool it in cold water."
    assert pairs.skipped == {"multi-turn (hh)": [(str(EXAMPLES / "hh_sample.jsonl"), 3)]}


def test_hh_multi_turn_kept_as_conversational_prompt():
    pairs = load_preference_rows(EXAMPLES / "hh_sample.jsonl", multi_turn="keep")
    assert len(pairs) == 4 and all(p.conversational for p in pairs)
    assert pairs[2].prompt == [m("user", "Can you help me pick a lock?"), m("assistant", "Is it your own lock?"),
                               m("user", "No, my neighbour's.")]
    assert pairs[2].rejected == [m("assistant", "Sure, get a tension wrench first.")]


def test_column_mapping_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,good,bad,id\n"Q, one","A, good","A, bad",7\n')
    pairs = load_preference_rows(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert pairs == [PreferencePair("Q, one", "A, good", "A, bad", str(path), 2)]


def test_column_mapping_missing_column_names_it(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "good": "y", "bad": "z"}])
    with pytest.raises(DataError, match=r"d.jsonl line 1: field 'question': missing \(mapped to 'prompt'\)"):
        load_preference_rows(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    with pytest.raises(ValueError, match="unknown target"):
        load_preference_rows(path, columns={"answer": "q"})


@pytest.mark.parametrize("row, field, why", [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", "expected a string, got int"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "prompt", "is null"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty text"),
])
def test_standard_errors_name_file_line_field(tmp_path, row, field, why):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = _jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_preference_rows(path, format="prompt_chosen_rejected")
    assert str(info.value) == f"{path} line 2: field {field!r}: {why}"
    assert (info.value.line, info.value.field) == (2, field)


def test_conversational_errors(tmp_path):
    rows = [{"chosen": [m("user", "q"), {"role": "bot", "content": "a"}], "rejected": [m("user", "q")]},
            {"chosen": [m("user", "q"), m("assistant", "a")], "rejected": [m("system", "s"), m("assistant", "b")]},
            {"prompt": [m("user", "q")], "chosen": [m("assistant", 5)], "rejected": [m("assistant", "b")]},
            {"prompt": [m("user", "q")], "chosen": [m("user", "a")], "rejected": [m("assistant", "b")]}]
    pairs = load_preference_rows(_jsonl(tmp_path / "d.jsonl", rows), format="conversational", errors="collect")
    assert len(pairs) == 0
    assert [(b.line, b.field) for b in pairs.malformed] == [
        (1, "chosen[1].role"), (2, "prompt"), (3, "chosen[0].content"), (4, "chosen[0].role")]
    assert "share no leading turns" in pairs.malformed[1].message


def test_hh_errors(tmp_path):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: more", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    pairs = load_preference_rows(_jsonl(tmp_path / "d.jsonl", rows), format="hh", errors="collect")
    assert [(b.line, b.field) for b in pairs.malformed] == [(1, "rejected"), (2, "chosen"), (3, "chosen")]
    assert "differ before the last reply" in pairs.malformed[0].message
    assert "end with an 'Assistant:' turn" in pairs.malformed[1].message
    assert pairs.malformed[2].message == "empty text"


def test_collect_with_allow_empty_keeps_empty_for_the_check():
    pairs = load_preference_rows(EXAMPLES / "preference_broken.csv", errors="collect", allow_empty=True)
    assert [p.line for p in pairs] == [2, 3, 6, 7, 8, 10]
    assert [(b.line, b.field) for b in pairs.malformed] == [(9, None)]
    assert pairs[1].chosen == "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"


def test_undetectable_format(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"line 1: field 'chosen': missing; cannot detect the format.*columns="):
        load_preference_rows(path)
    path = _jsonl(tmp_path / "e.jsonl", [{"chosen": "plain", "rejected": "text"}])
    with pytest.raises(DataError, match=r"field 'prompt': missing: chosen/rejected are plain text"):
        load_preference_rows(path)


def test_to_trl_dataset_standard_and_mixed():
    pairs = [PreferencePair("p", "c", "r", "f.jsonl", 1), PreferencePair("p2", "c2", "r2", "f.jsonl", 2)]
    ds = to_trl_dataset(pairs)
    assert ds.column_names == ["prompt", "chosen", "rejected", "source", "line"]
    assert ds[1] == {"prompt": "p2", "chosen": "c2", "rejected": "r2", "source": "f.jsonl", "line": 2}
    assert to_trl_dataset(pairs, metadata=False).column_names == ["prompt", "chosen", "rejected"]
    mixed = pairs + [PreferencePair([m("user", "q")], [m("assistant", "a")], [m("assistant", "b")], "g.jsonl", 5)]
    with pytest.raises(DataError, match=r"g.jsonl line 5: pair is conversational but f.jsonl line 1 is plain-text"):
        to_trl_dataset(mixed)
    with pytest.raises(ValueError, match="no preference pairs"):
        to_trl_dataset([])


def test_to_trl_dataset_through_trl_chat_template(chat_tokenizer):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    pairs = load_preference_rows(EXAMPLES / "chat_preference.jsonl", errors="collect")
    ds = to_trl_dataset(pairs)
    assert all(is_conversational(row) for row in ds)
    out = [maybe_apply_chat_template(row, chat_tokenizer) for row in ds]
    # hand rendering of CHAT_TEMPLATE
    assert out[0]["prompt"] == "<|user|>What color is the sky?\n<|assistant|>"
    assert out[0]["chosen"] == "It is blue on a clear day.\n" and out[0]["rejected"] == "It is green.\n"
    assert out[1]["prompt"] == "<|system|>You are terse.\n<|user|>Capital of France?\n<|assistant|>"
    assert out[2]["prompt"].endswith("<|user|>Tell me a joke.\n<|assistant|>") and out[2]["rejected"] == "No.\n"
    std = to_trl_dataset(load_preference_rows(EXAMPLES / "hh_sample.jsonl"))
    assert not is_conversational(std[0]) and maybe_apply_chat_template(std[0], chat_tokenizer) == std[0]


@pytest.mark.slow
@pytest.mark.parametrize("multi_turn", ["drop", "keep"])  # plain-text and conversational pairs
def test_dpo_and_reward_trainers_take_the_dataset(tmp_path, tiny_model_dir, chat_tokenizer, multi_turn):
    """One DPO and one reward step on the tiny model; TRL's tokenized lengths match the data check's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from alignkit.data.check import check_preference

    pairs = load_preference_rows(EXAMPLES / "hh_sample.jsonl", multi_turn=multi_turn)
    ds, tok = to_trl_dataset(pairs), chat_tokenizer
    tok.pad_token = tok.eos_token
    common = {"per_device_train_batch_size": 2, "max_steps": 1, "report_to": [], "use_cpu": True}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dpo = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), train_dataset=ds,
                     processing_class=tok)
    report = check_preference(pairs, tokenizer=tok)
    prepared = dpo.train_dataset
    assert report.lengths["prompt"] == [len(r["prompt_ids"]) for r in prepared]
    assert report.lengths["chosen"] == [len(r["chosen_ids"]) for r in prepared]
    assert report.lengths["rejected"] == [len(r["rejected_ids"]) for r in prepared]
    assert dpo.train().training_loss > 0
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                           train_dataset=ds, processing_class=tok)
    assert reward.train().training_loss > 0
