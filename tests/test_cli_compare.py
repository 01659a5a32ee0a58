"""``alignkit compare``: n and 95% intervals (Wilson by hand, the bootstrap re-done here), "not measured"
never drawn as 0, and ``--fail-on-regression`` exit codes, on run folders written by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ReplyGenerator

from alignkit.cli import compare as compare_cli
from alignkit.eval import report
from alignkit.eval.judge import length_controlled_win_rate
from alignkit.eval.metrics import wilson_interval
from alignkit.eval.runner import run_eval

Z95 = 1.959963984540054


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson 1927 score interval, written out here from the formula."""
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return centre - half, centre + half


def percentile_bootstrap(stat, n: int, seed: int = 0, replicas: int = 2000) -> tuple[float, float]:
    """Efron's percentile bootstrap over example indices, as the module docstring describes it."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, size=n)) for _ in range(replicas)]
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def gsm8k(correct: int, n: int, unparseable: int = 0) -> dict:
    return {"accuracy": correct / n, "n": n, "correct": correct, "unparseable": unparseable}


def write_run(folder: Path, metrics: dict, prefs: list[float | None] | None = None) -> Path:
    """results.json and, with ``prefs``, AlpacaEval predictions + judgments (output i has 10 + 3 i chars)."""
    folder.mkdir(parents=True)
    if prefs is not None:
        d = folder / "alpaca_eval"
        d.mkdir()
        outs = ["x" * (10 + 3 * i) for i in range(len(prefs))]
        refs = ["r" * (12 + (i % 4)) for i in range(len(prefs))]
        preds = [{"id": str(i), "example": {"instruction": f"q{i}", "reference": refs[i]}, "output": outs[i]}
                 for i in range(len(prefs))]
        judged = [{"id": str(i), "output": outs[i], "judge": {"preference": p}} for i, p in enumerate(prefs)]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
        (d / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judged))
        valid = [p for p in prefs if p is not None]
        lc = length_controlled_win_rate(valid, [len(o) for o, p in zip(outs, prefs) if p is not None],
                                        [len(r) for r, p in zip(refs, prefs) if p is not None])
        metrics = {**metrics, "alpaca_eval": {"win_rate": sum(valid) / len(valid), "n": len(prefs),
                                              "n_judged": len(valid), "lc_win_rate": lc["lc_win_rate"]}}
    (folder / "results.json").write_text(json.dumps({"metrics": metrics}))
    return folder


PREFS = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, None, 0.0, 1.0, 1.0, 0.5, 1.0]


@pytest.fixture(params=[PREFS])
def runs(tmp_path, request):
    """base (gsm8k, over_refusal and, unless the parameter is None, judged AlpacaEval) and dpo (gsm8k, sst,
    over_refusal)."""
    base = write_run(tmp_path / "base", {"gsm8k": gsm8k(20, 40, unparseable=4),
                                         "over_refusal": {"refusal_rate": 0.1, "n": 30, "refusals": 3}}, request.param)
    dpo = write_run(tmp_path / "dpo", {"gsm8k": gsm8k(19, 40),
                                       "sst": {"proportion_safe": 0.9, "safe": 9, "unsafe": 1, "n": 11},
                                       "over_refusal": {"refusal_rate": 0.2, "n": 30, "refusals": 6}})
    return base, dpo


def cmp(runs, tmp_path, *extra) -> int:
    return compare_cli.main([*map(str, runs), "--output", str(tmp_path / "cmp"), *extra])


def cells(tmp_path) -> dict:
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    return {(m["task"], m["metric"], run): cell for m in data["metrics"] for run, cell in m["runs"].items()}


def test_every_value_has_n_and_a_hand_checked_interval(runs, tmp_path):
    assert cmp(runs, tmp_path) == 0
    got = cells(tmp_path)
    expected = {("gsm8k", "accuracy", "base"): (20, 40), ("gsm8k", "accuracy", "dpo"): (19, 40),
                ("gsm8k", "format_rate", "base"): (36, 40), ("gsm8k", "format_rate", "dpo"): (40, 40),
                ("sst", "proportion_safe", "dpo"): (9, 10),  # n = validly judged, not the 11 prompts
                ("over_refusal", "refusal_rate", "base"): (3, 30), ("over_refusal", "refusal_rate", "dpo"): (6, 30)}
    for key, (k, n) in expected.items():
        c = got[key]
        assert (c["value"], c["n"], c["method"]) == (pytest.approx(k / n), n, "wilson"), key
        lo, hi = wilson(k, n)
        assert c["lo"] == pytest.approx(lo, abs=1e-12) and c["hi"] == pytest.approx(min(hi, 1.0), abs=1e-12), key
    assert got[("gsm8k", "format_rate", "dpo")]["hi"] == 1.0  # 40/40: the interval touches 1 exactly


def test_win_rate_intervals_bootstrap_the_judgments(runs, tmp_path):
    assert cmp(runs, tmp_path, "--seed", "3") == 0
    got = cells(tmp_path)
    valid = np.array([p for p in PREFS if p is not None])
    win = got[("alpaca_eval", "win_rate", "base")]
    assert (win["value"], win["n"], win["method"]) == (pytest.approx(valid.mean()), 11, "bootstrap")
    lo, hi = percentile_bootstrap(lambda idx: valid[idx].mean(), len(valid), seed=3)
    assert (win["lo"], win["hi"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    se = valid.std() / math.sqrt(len(valid))  # the normal approximation, for scale
    assert win["hi"] - win["lo"] == pytest.approx(2 * Z95 * se, rel=0.35)
    lc = got[("alpaca_eval", "lc_win_rate", "base")]
    assert lc["method"] == "bootstrap" and lc["lo"] < lc["value"] < lc["hi"] and lc["n"] == 11
    for key in [("alpaca_eval", "win_rate", "dpo"), ("alpaca_eval", "lc_win_rate", "dpo"), ("sst", "proportion_safe", "base")]:
        assert got[key] == {"value": None, "n": None, "lo": None, "hi": None, "method": "not measured"}


def test_a_win_rate_without_its_judgments_says_so(runs, tmp_path):
    (runs[0] / "alpaca_eval" / "judgments.jsonl").unlink()
    assert cmp(runs, tmp_path) == 0
    win = cells(tmp_path)[("alpaca_eval", "win_rate", "base")]
    assert win["lo"] is None and win["n"] == 11 and win["method"] == "no interval: no alpaca_eval/judgments.jsonl"


def test_markdown_says_not_measured_and_keeps_the_value_table(runs, tmp_path, capsys):
    assert cmp(runs, tmp_path, "--names", "base,dpo") == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| gsm8k | accuracy | 0.5000 | 0.4750 |" in md
    assert "| sst | proportion_safe | not measured | 0.9000 |" in md
    assert "| over_refusal | refusal_rate (lower better) | 0.1000 | 0.2000 |" in md
    lo, hi = wilson(19, 40)
    assert f"| gsm8k | accuracy | dpo | 0.4750 | 40 | [{lo:.4f}, {hi:.4f}] | wilson |" in md
    assert "| sst | proportion_safe | base | not measured | - | - | not measured |" in md
    assert "| sst | proportion_safe | base | not measured |" in capsys.readouterr().out


def test_chart_leaves_a_labelled_gap_for_a_metric_not_measured(runs, monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(report, "save_figure_atomic", lambda fig, path, **kw: figures.append(fig) or path)
    results = {d.name: report.load_run(d) for d in runs}
    rows = report.comparison_rows(results, list(runs))
    report.comparison_chart(results, rows, tmp_path / "c.png")
    ax = figures[0].axes[0]
    measured = sum(c.measured for r in rows for c in r.cells)
    assert len(ax.patches) == measured < 2 * len(rows)  # one bar per measured value, none for the rest
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == sorted(
        round(c.value, 6) for r in rows for c in r.cells if c.measured)
    labels = [t for t in ax.texts if t.get_text() == "not measured"]
    assert len(labels) == 2 * len(rows) - measured


@pytest.mark.parametrize(("spec", "code"), [
    (["gsm8k/accuracy=0.02"], 1),            # 0.500 -> 0.475: worse by 0.025
    (["gsm8k/accuracy=0.025"], 0),           # exactly the allowance is not a regression
    (["gsm8k/accuracy=0.03"], 0),
    (["over_refusal/refusal_rate=0.05"], 1),  # lower is better: 0.1 -> 0.2 is worse by 0.1
    (["over_refusal/refusal_rate=0.1"], 0),
    (["gsm8k/format_rate=0"], 0),            # 0.9 -> 1.0 improved
    (["gsm8k/accuracy=0.03,over_refusal/refusal_rate=0.05"], 1),
    (["gsm8k/accuracy=0.03", "gsm8k/format_rate=0"], 0),
])
@pytest.mark.parametrize("runs", [None], indirect=True)  # no AlpacaEval: no bootstrap to wait for
def test_fail_on_regression_exit_codes(runs, tmp_path, capsys, spec, code):
    args = [x for s in spec for x in ("--fail-on-regression", s)]
    assert cmp(runs, tmp_path, *args) == code
    out = capsys.readouterr().out
    assert ("REGRESSION: " in out) == (code == 1)
    checks = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["regression_checks"]
    assert len(checks) == sum(len(s.split(",")) for s in spec) and any(c["regressed"] for c in checks) == (code == 1)


@pytest.mark.parametrize("runs", [None], indirect=True)
def test_regression_direction_follows_run_order(runs, tmp_path):
    assert cmp(runs[::-1], tmp_path, "--fail-on-regression", "over_refusal/refusal_rate=0.05") == 0  # 0.2 -> 0.1
    assert cmp(runs[::-1], tmp_path, "--fail-on-regression", "gsm8k/format_rate=0.05") == 1  # 1.0 -> 0.9


@pytest.mark.parametrize(("spec", "message"), [
    ("sst/proportion_safe=0.01", "sst/proportion_safe: not measured in run(s) base"),
    ("alpaca_eval/win_rate=0.01", "alpaca_eval/win_rate: not measured in run(s) base, dpo"),
    ("mmlu/accuracy=0.01", "mmlu/accuracy: not measured in run(s) base, dpo"),
    ("gsm8k/bleu=0.1", "unknown metric 'gsm8k/bleu'"),
    ("gsm8k/accuracy", "expected TASK/METRIC=DELTA"),
    ("accuracy=0.1", "expected TASK/METRIC=DELTA"),
    ("gsm8k/accuracy=much", "DELTA 'much' is not a number"),
    ("gsm8k/accuracy=-0.1", "DELTA must be >= 0"),
])
@pytest.mark.parametrize("runs", [None], indirect=True)
def test_fail_on_regression_errors_name_the_metric(runs, tmp_path, capsys, spec, message):
    assert cmp(runs, tmp_path, "--fail-on-regression", spec) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "comparison.md").exists()  # refused before anything is written


def test_fail_on_regression_needs_two_runs(runs, tmp_path, capsys):
    assert cmp(runs[:1], tmp_path, "--fail-on-regression", "gsm8k/accuracy=0.1") == 2
    assert "at least two runs" in capsys.readouterr().err


def test_a_metric_only_the_first_run_measured_is_named(runs, tmp_path, capsys):
    assert cmp(runs, tmp_path, "--fail-on-regression", "alpaca_eval/lc_win_rate=0.1") == 2
    assert "alpaca_eval/lc_win_rate: not measured in run(s) dpo" in capsys.readouterr().err


def test_intervals_from_a_real_judged_eval_run(tmp_path):
    """run_eval's own folders: the bootstrap reads its judgments and reproduces its win rates."""
    def judge(prompt):  # prefers an output that says "detail"; otherwise the first one (a tie over both orders)
        a, b = prompt.split("# Output (a):\n")[1].split("\n\n# Output (b):\n")
        return "[[B]]" if "detail" in b and "detail" not in a else "[[A]]"

    dirs = []
    for name, reply in (("short", lambda p: "ok 7"), ("long", lambda p: "ok 7" + " detail" * (len(p) % 2))):
        run_eval(ReplyGenerator(reply, name), ["alpaca_eval", "gsm8k"], str(tmp_path / name), limit=6,
                 judge=ReplyGenerator(judge, "judge"))
        dirs.append(tmp_path / name)
    assert cmp(dirs, tmp_path, "--fail-on-regression", "alpaca_eval/win_rate=0.1") == 0
    got = cells(tmp_path)
    for name in ("short", "long"):
        metrics = json.loads((tmp_path / name / "results.json").read_text())["metrics"]
        for metric in ("win_rate", "lc_win_rate"):
            c = got[("alpaca_eval", metric, name)]
            assert c["method"] == "bootstrap" and c["value"] == metrics["alpaca_eval"][metric]
            assert c["n"] == metrics["alpaca_eval"]["n_judged"] == 6 and c["lo"] <= c["value"] <= c["hi"]
        acc = got[("gsm8k", "accuracy", name)]
        assert acc["method"] == "wilson" and acc["n"] == 6
    assert cmp(dirs[::-1], tmp_path, "--fail-on-regression", "alpaca_eval/win_rate=0.1") == 1


def test_a_rate_over_zero_examples_is_not_measured(tmp_path):
    # what the tasks write when nothing was validly judged: proportion_safe 0.0 over safe + unsafe = 0
    a = write_run(tmp_path / "a", {"sst": {"proportion_safe": 0.0, "safe": 0, "unsafe": 0, "n": 5},
                                   "gsm8k": gsm8k(0, 4)})
    b = write_run(tmp_path / "b", {"sst": {"proportion_safe": 0.8, "safe": 4, "unsafe": 1, "n": 5},
                                   "gsm8k": gsm8k(1, 4)})
    assert cmp([a, b], tmp_path, "--fail-on-regression", "gsm8k/accuracy=0") == 0
    got = cells(tmp_path)
    assert got[("sst", "proportion_safe", "a")] == {"value": None, "n": 0, "lo": None, "hi": None,
                                                    "method": "not measured (n = 0)"}
    assert got[("gsm8k", "accuracy", "a")]["value"] == 0.0 and got[("gsm8k", "accuracy", "a")]["lo"] == 0.0
    assert cmp([a, b], tmp_path, "--fail-on-regression", "sst/proportion_safe=0") == 2


def test_safety_rates_take_their_own_counts_from_the_task_table():
    """attack_success_rate is over the attack prompts only (8 of the run's 10 examples): Wilson(2, 8)."""
    table = [{"row": "all attacks", "metric": "attack_success_rate", "n": 8, "count": 2, "rate": 0.25},
             {"row": "benign", "metric": "over_refusal_rate", "n": 2, "count": 1, "rate": 0.5}]
    results = {"metrics": {"safety": {"attack_success_rate": 0.25, "over_refusal_rate": 0.5, "n": 10,
                                      "table": table}}}
    m = report.measure(results, None, "safety", "attack_success_rate")
    assert (m.value, m.n, m.method) == (0.25, 8, "wilson") and (m.lo, m.hi) == wilson_interval(2, 8)
    m = report.measure(results, None, "safety", "over_refusal_rate")
    assert m.n == 2 and (m.lo, m.hi) == wilson_interval(1, 2)
