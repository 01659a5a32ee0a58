"""Padding-free preference collator: the layout of the row, checked by hand and against TRL's padded collator."""
from __future__ import annotations

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from alignkit.data.dpo_packing import PaddingFreePreferenceCollator, padding_fraction, sequence_sums

EXAMPLES = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6],
             "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11],
             "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]


def test_row_layout_by_hand():
    b = PaddingFreePreferenceCollator()(EXAMPLES)
    # chosen 1, chosen 2, rejected 1, rejected 2, end to end
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert b["segment_ids"].tolist() == [[0] * 5 + [1] * 3 + [2] * 4 + [3] * 4]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1]]
    x = -100  # position t scores token t+1 only inside its own sequence's completion
    assert b["shift_labels"].tolist() == [[x, x, 4, 5, x, x, 9, x, x, x, 6, x, x, 10, 11, x]]
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 16] and b["max_length_q"] == 5
    assert b["ref_chosen_logps"].tolist() == [-1.0, -1.5] and b["ref_rejected_logps"].tolist() == [-2.0, -2.5]


@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (4, "keep_start"), (3, "keep_end")])
def test_same_tokens_and_masks_as_trl_padded(max_length, mode):
    ours = PaddingFreePreferenceCollator(max_length, mode)(EXAMPLES)
    theirs = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(EXAMPLES)
    keep = theirs["attention_mask"].bool()  # (2B, T): TRL's rows without their pads
    assert ours["input_ids"][0].tolist() == theirs["input_ids"][keep].tolist()
    assert ours["completion_mask"][0].tolist() == theirs["completion_mask"][keep].tolist()
    lengths = sequence_sums(torch.ones_like(ours["input_ids"]), ours["segment_ids"], 4)
    assert lengths.tolist() == theirs["attention_mask"].sum(1).tolist()


def test_sequence_sums_and_padding_fraction():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert sequence_sums(values, torch.tensor([[0, 0, 2, 2]]), 3).tolist() == [3.0, 0.0, 7.0]
    # lengths 5, 3, 4, 4 padded to 5: 16 of 20 tokens are real
    assert padding_fraction(EXAMPLES) == pytest.approx(1 - 16 / 20)


def test_shared_prompt_layout_by_hand():
    b = PaddingFreePreferenceCollator(share_prompt=True)(EXAMPLES)
    # chosen 1, rejected 1 from the last prompt token (position 2), chosen 2, rejected 2 from position 1
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 8, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert b["shared_prefix_lens"].tolist() == [0, 2, 0, 1]
    assert b["segment_ids"].tolist() == [[0] * 5 + [2] * 2 + [1] * 3 + [3] * 3]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1]]
    x = -100  # the rejected copy's first token (the last prompt token) predicts its first reply token
    assert b["shift_labels"].tolist() == [[x, x, 4, 5, x, 6, x, x, 9, x, 10, 11, x]]
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 7, 10, 13]
    # the same labels as the unshared row, sequence by sequence
    plain = PaddingFreePreferenceCollator()(EXAMPLES)
    for seg in range(4):
        ours = b["shift_labels"][b["segment_ids"] == seg]
        theirs = plain["shift_labels"][plain["segment_ids"] == seg]
        assert ours[ours != -100].tolist() == theirs[theirs != -100].tolist()


@pytest.mark.parametrize("c,r,expected", [
    (([1, 2, 3, 4], [0, 0, 0, 1]), ([1, 2, 3, 5], [0, 0, 0, 1]), 2),  # prompt of 3: share 2, keep the last
    (([1, 2, 3, 4], [0, 0, 1, 1]), ([1, 2, 3, 4], [0, 0, 1, 1]), 1),  # the same reply start is not shared
    (([9, 2, 3, 4], [0, 0, 0, 1]), ([1, 2, 3, 5], [0, 0, 0, 1]), 0),  # keep_end cut the prompts apart
    (([1, 4], [0, 1]), ([1, 5], [0, 1]), 0),  # a one-token prompt: nothing to share
])
def test_shared_prefix_stops_at_the_prompt(c, r, expected):
    from alignkit.data.dpo_packing import shared_prefix

    assert shared_prefix(*c, *r) == expected
