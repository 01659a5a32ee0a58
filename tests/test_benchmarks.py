"""Benchmarks: the smoke suite runs end to end and alignkit's values agree with the baseline's.

Never asserts a time: timings on CI machines are noise. The fast tests check the pieces that
turn measurements into ratios, the CPU peak-memory probe, and the batching test server.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.common import Row, peak_cpu_bytes, tensor_bytes


def test_row_ratio_direction_and_target():
    fast = Row("throughput", alignkit=30.0, baseline=20.0, unit="tok/s", target=1.3)
    assert fast.ratio == pytest.approx(1.5) and fast.met is True
    small = Row("memory", alignkit=10.0, baseline=25.0, unit="MiB", target=2.0, higher_is_better=False)
    assert small.ratio == pytest.approx(2.5) and small.met is True
    slow = Row("time", alignkit=4.0, baseline=5.0, unit="s", target=1.3, higher_is_better=False)
    assert slow.ratio == pytest.approx(1.25) and slow.met is False
    assert Row("x", None, 1.0, "s").ratio is None and Row("x", 1.0, 1.0, "s").met is None


def test_report_redraws_plots_and_table_from_saved_json(tmp_path):
    """``python -m benchmarks.report``: a saved run (rows + plot data) becomes RESULTS.md and PNGs again;
    two rows whose names share a long prefix stay two rows (in the table and as two bars)."""
    from benchmarks import report

    long = "DPO step: precomputed ref log-probs vs live ref forward (TRL"
    rows = [Row(long + ")", 2.0, 1.0, "steps/s", target=1.3), Row(long + ", LoRA)", 1.2, 1.0, "steps/s", target=1.3)]
    doc = {"date": "2026-01-01T00:00:00", "machine": "m", "threads": 2, "size": "full", "model": "tiny",
           "versions": {"torch": "t", "transformers": "x", "trl": "y"}, "total_s": 1.0, "errors": {},
           "rows": [r.to_dict() for r in rows],
           "plot_data": [{"name": "curve", "title": "t", "xlabel": "x", "ylabel": "y",
                          "series": {"a": [[1, 2, 4], [3.0, 2.0, 1.0]]}, "logx": True},
                         {"name": "costs", "title": "t", "xlabel": "x", "ylabel": "y",
                          "series": {"a": [[1, 2, 4], [1.0, 4.0, 16.0]]}, "loglog": True}]}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(doc))
    assert report.main([str(saved), str(tmp_path / "RESULTS.md")]) == 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| 2.00x | >= 1.3x | yes |" in table and "| 1.20x | >= 1.3x | no |" in table
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "ratios.png").is_file()
    assert (tmp_path / "costs.png").read_bytes()[:4] == b"\x89PNG"  # log-log, fitted exponent 2
    assert Row.from_dict(doc["rows"][1]).ratio == pytest.approx(1.2)


def test_fit_exponent_recovers_power_laws():
    from benchmarks.common import fit_exponent

    xs = [128, 256, 512, 1024]
    assert fit_exponent(xs, [3.0 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [0.5 * x for x in xs]) == pytest.approx(1.0)
    # hand least squares over (log 1, log 1), (log 2, log 4), (log 4, log 8): slope = 1.5
    assert fit_exponent([1, 2, 4], [1, 4, 8]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        fit_exponent([2, 2], [1, 3])


def test_prompt_lookup_replay_by_hand():
    """probe_decode's replay of n-gram speculation on prompt [1, 2, 3, 4] and greedy output [5, 1, 2, 3]:
    steps 1-2 find no earlier occurrence of the tail (one token each); at [.., 5, 1] the tail [1] occurred at 0,
    so the draft is [2] (k capped at 1: the last token is the model's own pick) and is accepted with the bonus 3.
    3 verify steps for 4 tokens; at step costs 1 (q=1) and 1.5 (q=2): 4 plain steps / 3.5 = 8/7."""
    from benchmarks.probe_decode import draft, speculation

    assert draft([1, 2, 3, 4], 2) == [] and draft([1, 2, 3, 4, 5, 1], 1) == [2]
    assert draft([7, 8, 9, 7, 8], 3) == [9, 7, 8]  # the longest tail that occurred before wins ([7, 8] at 0)
    per_step, gain = speculation([([1, 2, 3, 4], [5, 1, 2, 3])], 2, {1: 1.0, 2: 1.5, 3: 2.0})
    assert per_step == pytest.approx(4 / 3) and gain == pytest.approx(8 / 7)


def test_grpo_reward_agreement_says_when_it_could_not_fail():
    """Means within 3 Welch standard errors: [1, 0] against [0, 0] is 0.5 apart with se = sqrt(0.25 / 2), so
    tolerance 1.06 (passes, and could have failed); all zeros on both sides pass without saying anything."""
    from benchmarks.suite_grpo import _reward_agreement

    out = _reward_agreement([[1.0, 0.0]], [[0.0, 0.0]], "format_reward")
    assert out["mean_format_reward_diff"] == 0.5
    assert out["mean_format_reward_tolerance"] == pytest.approx(3 * 0.125 ** 0.5)
    assert out["format_rewards_ok"] and out["format_reward_informative"]
    far = _reward_agreement([[1.0, 1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]])
    assert not far["rewards_ok"] and far["reward_informative"]  # 0.75 apart, tolerance 3 * sqrt(0.1875 / 4) = 0.65
    vacuous = _reward_agreement([[0.0, 0.0]], [[0.0, 0.0, 0.0]])
    assert vacuous["rewards_ok"] and not vacuous["reward_informative"] and vacuous["samples"] == [2, 3]


def test_parameter_counts_at_scale_match_peft_and_the_live_model(tiny_model):
    """The counts behind the 1B/8B memory rows: base and LoRA parameters equal what PEFT adds to a real model."""
    import copy

    from peft import get_peft_model

    from benchmarks.suite_memory import _lora_config, counts

    lora = _lora_config()
    n_total, n_quant, n_lora = counts(tiny_model, lora.r, sorted(lora.target_modules))
    assert n_total == sum(p.numel() for p in tiny_model.parameters())
    peft_model = get_peft_model(copy.deepcopy(tiny_model), lora)
    assert n_lora == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    embed = tiny_model.get_input_embeddings().weight.numel()
    assert n_quant == n_total - embed - sum(p.numel() for n, p in tiny_model.named_parameters() if "norm" in n) \
        - (0 if tiny_model.config.tie_word_embeddings else tiny_model.lm_head.weight.numel())


def test_peak_cpu_bytes_sees_a_temporary_tensor():
    n = 1 << 20  # 1 Mi floats = 4 MiB, freed before fn returns

    def fn():
        t = torch.ones(n)
        return float(t.sum())

    peak, out = peak_cpu_bytes(fn)
    assert out == n
    assert 4 * n <= peak < 4 * n + 64 * 1024  # the tensor, plus at most a few small scalars


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(100)
    assert tensor_bytes([a, a[:10], torch.zeros(5, dtype=torch.float64), None]) == 400 + 40


def test_batching_server_batches_concurrent_requests(tiny_model, gpt2_tokenizer):
    from alignkit.generation.base import SamplingParams
    from alignkit.generation.hf import HFGenerator
    from alignkit.generation.openai_http import OpenAIHTTPGenerator
    from benchmarks.batching_server import BatchingServer

    params = SamplingParams(max_new_tokens=4)
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(6)]
    local = HFGenerator(tiny_model, gpt2_tokenizer, batch_size=1).generate(prompts, params)
    server = BatchingServer(HFGenerator(tiny_model, gpt2_tokenizer, batch_size=8), window_s=0.2)
    with server as url:
        remote = OpenAIHTTPGenerator(url, "bench", max_concurrency=6).generate(prompts, params)
    assert [c.text for c in remote] == [c.text for c in local]  # greedy: same text, in input order
    assert max(server.batch_sizes) > 1 and sum(server.batch_sizes) == len(prompts)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    from benchmarks.run import SUITES, run

    out = tmp_path_factory.mktemp("bench")
    return run(SUITES["cpu"], "smoke", out, "test"), out


@pytest.mark.slow
def test_smoke_suite_runs_and_agrees(smoke_results):
    doc, out = smoke_results
    assert doc["errors"] == {}
    by_bench = {}
    for row in doc["rows"]:
        by_bench.setdefault(row["details"]["benchmark"], []).append(row)
    assert set(by_bench) == {"logprobs", "data", "memory", "sft", "dpo", "generation", "http", "grpo", "scaling",
                            "scaling_rl"}
    for row in doc["rows"]:
        if row["agreement"]:
            assert row["agreement"]["ok"], (row["path"], row["agreement"])
    # the outputs a reader gets: JSON with every row, a table, plots
    files = {p.name for p in out.iterdir()}
    assert any(f.endswith(".json") for f in files) and "RESULTS.md" in files and "ratios.png" in files
    saved = json.loads(next(out.glob("*.json")).read_text())
    assert len(saved["rows"]) == len(doc["rows"])
    table = (out / "RESULTS.md").read_text()
    assert all(row["path"] in table for row in doc["rows"])


@pytest.mark.slow
def test_smoke_values_match_independent_checks(smoke_results):
    doc, _ = smoke_results
    rows = {r["path"]: r for r in doc["rows"]}
    # padded and padding-free SFT: same loss on the same tokens; cross-document packing differs
    sft = rows["SFT throughput: padding-free (TRL collator, position ids) vs padded"]["agreement"]
    assert sft["abs_diff_padding_free"] <= 1e-4 < sft["abs_diff_cross_doc"]
    assert sft["abs_diff_varlen"] <= 1e-4  # per-document SDPA: the same loss as the padded batch
    # chunked log-probs vs a float64 reference; the LM-head kernel and TRL's chunked kernel vs float64 too
    assert rows["per-token log-probs: peak memory"]["agreement"]["max_abs_diff_vs_float64"] <= 1e-5
    head = [r for path, r in rows.items() if path.startswith("per-token log-probs fwd+bwd: alignkit vs TRL")]
    assert head and all(r["agreement"]["max_abs_diff_vs_float64"] <= 1e-5 for r in head)
    assert all(r["agreement"]["trl_max_abs_diff_vs_float64"] <= 1e-5 for r in head)
    assert all(max(r["agreement"]["max_rel_diff_vs_float64"], r["agreement"]["trl_max_rel_diff_vs_float64"]) <= 2e-6
               for r in head)
    # GRPO: alignkit's and TRL's per-token log-probs of one fixed batch
    grpo_row = rows["GRPO steps/s: alignkit loop vs TRL GRPOTrainer (HF generate, LoRA)"]["agreement"]
    assert grpo_row["log_prob_max_abs_diff"] <= 1e-4
    # DPO with precomputed reference log-probs: the same per-step losses as with a live reference
    dpo = rows["DPO step: precomputed ref log-probs vs live ref forward (TRL)"]["agreement"]
    assert dpo["losses_live_ref"] == pytest.approx(dpo["losses_precomputed"], abs=1e-5)
    # alignkit's padding-free DPO and TRL's padded DPOTrainer: the same per-step losses
    ours = rows["DPO step: alignkit (padding-free + precomputed ref) vs TRL DPOTrainer best (precomputed ref)"]
    assert ours["agreement"]["losses_alignkit"] == pytest.approx(ours["agreement"]["losses_trl"], abs=1e-4)
    assert ours["details"]["tokens_per_step_alignkit"] < ours["details"]["tokens_per_step_trl"]  # no pads
    # full fine-tuning: 16 bytes per parameter (fp32 weights + grads + two AdamW moments)
    full = rows["memory: full (params + grads + AdamW), measured vs computed"]
    assert full["alignkit"] * 2**20 == pytest.approx(16 * full["details"]["base_params"], rel=1e-6)
