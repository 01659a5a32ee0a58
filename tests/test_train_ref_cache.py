"""On-disk cache of precomputed DPO reference log-probs (alignkit.train.ref_cache, train.ref_cache_dir)."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.data.preference import PreferencePair
from alignkit.train import ref_cache
from alignkit.train.dpo import AlignkitDPOTrainer, DPOArgs, to_trl_pairs

PAIRS = [("What is 2 plus 2?", "It is 4.", "It is 5, I think."),
         ("Name a colour.", "Blue.", "A colour is a colour."),
         ("Say hi.", "Hi there!", "No.")]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-ref"), seed=1)


@pytest.fixture
def calls(monkeypatch):
    """Counts reference forwards (AlignkitDPOTrainer.compute_ref_log_probs calls)."""
    count = []
    original = AlignkitDPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        count.append(1)
        return original(self, model, inputs)

    monkeypatch.setattr(AlignkitDPOTrainer, "compute_ref_log_probs", counting)
    return count


def _trainer(tmp_path, model_dir, ref_dir, *, cache, pairs=PAIRS, beta=0.1, **kw):
    args = DPOArgs(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_length=64, report_to="none",
                   use_cpu=True, bf16=False, beta=beta, precompute_ref_log_probs=True, ref_cache_dir=cache, **kw)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    data = to_trl_pairs([PreferencePair(p, c, r) for p, c, r in pairs], None)
    return AlignkitDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)


def _values(trainer):
    return trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]


def test_hit_on_rerun_with_another_beta(tmp_path, tiny_model_dir, ref_dir, calls, caplog):
    cache = tmp_path / "cache"
    uncached = _values(_trainer(tmp_path, tiny_model_dir, ref_dir, cache="off"))
    assert len(calls) == 2  # 3 pairs, batches of 2
    calls.clear()
    with caplog.at_level(logging.INFO, logger="alignkit.train"):
        first = _trainer(tmp_path, tiny_model_dir, ref_dir, cache=str(cache))
    assert len(calls) == 2 and "cache miss" in caplog.text
    assert len(list(cache.glob("*.json"))) == 1
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignkit.train"):
        second = _trainer(tmp_path, tiny_model_dir, ref_dir, cache=str(cache), beta=0.5, loss="ipo")
    assert calls == [] and "cache hit" in caplog.text  # no reference forward
    assert _values(first) == uncached and _values(second) == uncached  # float32 values, exactly
    batch = second._prepare_inputs(next(iter(second.get_train_dataloader())))
    assert batch["ref_chosen_logps"].shape == (2,) and torch.isfinite(second.compute_loss(second.model, batch))


def test_padding_free_rows_carry_the_cached_values(tmp_path, tiny_model_dir, ref_dir, calls):
    cache = str(tmp_path / "cache")
    padded = _values(_trainer(tmp_path, tiny_model_dir, ref_dir, cache=cache))
    calls.clear()
    packed = _trainer(tmp_path, tiny_model_dir, ref_dir, cache=cache, padding_free=True)
    assert calls == [] and _values(packed) == padded
    rows = [packed.train_dataset[i] for i in range(2)]
    batch = packed.data_collator(rows)
    assert batch["input_ids"].shape[0] == 1
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor(padded[0][:2]))


def test_miss_when_one_pair_or_the_model_changes(tmp_path, tiny_model_dir, ref_dir, calls):
    cache = tmp_path / "cache"
    base = _values(_trainer(tmp_path, tiny_model_dir, ref_dir, cache=str(cache)))
    calls.clear()
    changed = [*PAIRS[:2], ("Say hi.", "Hi there!", "Nope.")]
    other = _values(_trainer(tmp_path, tiny_model_dir, ref_dir, cache=str(cache), pairs=changed))
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2
    assert other[0] == base[0] and other[1][:2] == base[1][:2] and other[1][2] != base[1][2]
    calls.clear()
    _trainer(tmp_path, tiny_model_dir, tiny_model_dir, cache=str(cache))  # another reference model
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 3


def test_cache_key_parts(gpt2_tokenizer):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4]]})
    key = ref_cache.cache_key(model_hash="m", tokenizer=gpt2_tokenizer, dataset=data, settings={"max_length": 8})
    assert key == ref_cache.cache_key(model_hash="m", tokenizer=gpt2_tokenizer, dataset=data,
                                      settings={"max_length": 8})
    assert key != ref_cache.cache_key(model_hash="m2", tokenizer=gpt2_tokenizer, dataset=data,
                                      settings={"max_length": 8})
    assert key != ref_cache.cache_key(model_hash="m", tokenizer=gpt2_tokenizer, dataset=data,
                                      settings={"max_length": 9})
    other = Dataset.from_dict({"prompt_ids": [[1]], "chosen_ids": [[2, 3]], "rejected_ids": [[4]]})
    assert key != ref_cache.cache_key(model_hash="m", tokenizer=gpt2_tokenizer, dataset=other,
                                      settings={"max_length": 8})
    assert ref_cache.resolve_dir("off") is None and ref_cache.resolve_dir(None) == ref_cache.default_dir()


def test_unreadable_or_mismatched_file_is_a_miss(tmp_path):
    (tmp_path / "k.json").write_text("{not json")
    assert ref_cache.load(tmp_path, "k", 2) is None
    ref_cache.save(tmp_path, "k", [-1.0, -2.0], [-3.0, -4.0], {})
    assert ref_cache.load(tmp_path, "k", 2) == ([-1.0, -2.0], [-3.0, -4.0])
    assert ref_cache.load(tmp_path, "k", 3) is None  # another dataset size
