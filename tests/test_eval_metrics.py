"""pass@k, Wilson and bootstrap intervals against independent references (math.comb, exact fractions,
hand-written formulas, exact binomial coverage)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from alignkit.eval.metrics import (
    bootstrap_interval,
    normal_quantile,
    pass_at_k,
    pass_at_k_mean,
    wilson_interval,
)

Z95 = 1.959963984540054


def comb_reference(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic (math.comb is 0 when n - c < k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


# ----------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_math_comb_on_a_grid():
    worst = 0.0
    for n in range(1, 51):
        for c in range(n + 1):
            for k in range(1, n + 1):
                worst = max(worst, abs(pass_at_k(n, c, k) - comb_reference(n, c, k)))
    assert worst < 1e-12


def test_pass_at_k_large_n_where_binomials_overflow_floats():
    n, c, k = 100_000, 37, 1_000
    with pytest.raises(OverflowError):
        float(math.comb(n, k))  # the naive ratio cannot even be formed in floats
    expected = comb_reference(n, c, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-10)
    assert 0.3 < expected < 0.4  # 1 - (1 - k/n)^c ~ 1 - 0.99^37 ~ 0.31: a non-trivial value


def test_pass_at_k_special_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k = 5: every draw of 5 holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(np.int64(20), np.int64(4), 2) == pytest.approx(comb_reference(20, 4, 2))


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [(5, 6, 1, "0 <= c <= n"), (5, -1, 1, "0 <= c <= n"), (5, 2, 0, "1 <= k <= n"),
     (5, 2, 6, "1 <= k <= n")],
)
def test_pass_at_k_validates(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(("n", "c", "k"), [(5.0, 2, 1), (True, 1, 1), (5, "2", 1)])
def test_pass_at_k_refuses_non_integers(n, c, k):
    with pytest.raises(TypeError, match="must be an integer"):
        pass_at_k(n, c, k)


def test_pass_at_k_mean_is_the_mean_of_per_problem_estimates():
    problems = [(10, 0), (10, 3), (20, 19), (5, 5)]
    expected = sum(comb_reference(n, c, 4) for n, c in problems) / len(problems)
    assert pass_at_k_mean(problems, 4) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="problem 1"):
        pass_at_k_mean([(10, 3), (3, 1)], 4)
    with pytest.raises(ValueError, match="at least one"):
        pass_at_k_mean([], 1)


# ----------------------------------------------------------------------------- Wilson
def test_normal_quantile():
    assert normal_quantile(0.95) == pytest.approx(Z95, abs=1e-12)
    assert normal_quantile(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(1.0)


def test_wilson_8_of_10_by_hand():
    z, n, p = Z95, 10, 0.8
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(centre - half, abs=1e-12)
    assert hi == pytest.approx(centre + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the published table value


def test_wilson_edges_and_symmetry():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(Z95**2 / (20 + Z95**2), abs=1e-12)  # closed form at p = 0
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + Z95**2), abs=1e-12)
    for s in range(31):
        lo, hi = wilson_interval(s, 30)
        mirror_lo, mirror_hi = wilson_interval(30 - s, 30)
        assert lo == pytest.approx(1 - mirror_hi, abs=1e-12) and hi == pytest.approx(1 - mirror_lo, abs=1e-12)
        assert 0.0 <= lo <= s / 30 <= hi <= 1.0
    narrow, wide = wilson_interval(8, 10, 0.80), wilson_interval(8, 10, 0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_wilson_exact_coverage_is_near_nominal():
    for p, n in [(0.3, 50), (0.5, 100), (0.1, 200)]:
        coverage = 0.0
        for s in range(n + 1):
            lo, hi = wilson_interval(s, n)
            if lo <= p <= hi:
                coverage += math.comb(n, s) * p**s * (1 - p) ** (n - s)
        assert 0.92 < coverage < 0.98, (p, n, coverage)


@pytest.mark.parametrize(("s", "n"), [(3, 2), (-1, 5), (1, -1)])
def test_wilson_validates(s, n):
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(s, n)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_mean_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    lo, hi = bootstrap_interval(values)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert lo < values.mean() < hi
    assert (hi - lo) == pytest.approx(2 * Z95 * se, rel=0.15)
    assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.3 * se)


def test_bootstrap_is_reproducible_and_handles_other_statistics():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    lo, hi = bootstrap_interval(values, statistic=np.median, n_resamples=500)
    assert {lo, hi} <= {0.0, 0.5, 1.0}
    assert bootstrap_interval([2.5] * 7) == (2.5, 2.5)
    lo, hi = bootstrap_interval(values, confidence=0.5)
    wide_lo, wide_hi = bootstrap_interval(values, confidence=0.99)
    assert wide_lo <= lo <= 0.7 <= hi <= wide_hi


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [([], {}, "non-empty"), ([[1.0, 2.0]], {}, "1-D"), ([1.0, float("nan")], {}, "finite"),
     ([1.0], {"n_resamples": 0}, "n_resamples"), ([1.0], {"confidence": 0.0}, "confidence")],
)
def test_bootstrap_validates(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_interval(values, **kwargs)
