"""Sampling metrics and confidence intervals: pass@k, Wilson intervals, percentile bootstrap.

* :func:`pass_at_k` / :func:`pass_at_k_mean`: the unbiased pass@k estimator of Chen et al. 2021
  ("Evaluating Large Language Models Trained on Code", the Codex paper, section 2.1).
* :func:`wilson_interval`: the Wilson score interval for a binomial proportion (Wilson 1927), the
  interval to report beside an accuracy or a refusal rate.
* :func:`bootstrap_interval`: the percentile bootstrap (Efron 1979) for any statistic of a sample,
  e.g. a win rate computed from per-example scores.

Pure numpy (and the standard library); no torch.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from statistics import NormalDist

import numpy as np

__all__ = ["bootstrap_interval", "normal_quantile", "pass_at_k", "pass_at_k_mean", "wilson_interval"]


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k): the probability that at least one of ``k`` samples drawn
    without replacement from the ``n`` is correct. The binomials overflow floats for large ``n``, so
    it is computed as the product form of the paper's numpy snippet::

        1 - prod_{i=n-c+1}^{n} (1 - k / i)

    which is exactly 1.0 when ``n - c < k`` (every draw of ``k`` holds a correct sample).
    Requires ``0 <= c <= n`` and ``1 <= k <= n`` (``ValueError`` otherwise; ``TypeError`` for non-integers).
    """
    n, c, k = _as_int(n, "n"), _as_int(c, "c"), _as_int(k, "k")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n (c correct of n samples), got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (k drawn from n samples), got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_mean(per_problem: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over problems, each given as ``(n, c)``: n samples, c correct.

    This is the benchmark-level pass@k of Chen et al. 2021. Every problem needs ``n >= k``;
    an empty list is a ``ValueError``.
    """
    values = []
    for index, item in enumerate(per_problem):
        try:
            n, c = item
        except (TypeError, ValueError):
            raise ValueError(f"problem {index}: expected (n, c), got {item!r}") from None
        try:
            values.append(pass_at_k(n, c, k))
        except ValueError as error:
            raise ValueError(f"problem {index}: {error}") from None
    if not values:
        raise ValueError("pass_at_k_mean needs at least one (n, c) problem")
    return float(np.mean(values))


def normal_quantile(confidence: float) -> float:
    """The two-sided standard-normal critical value z with P(|Z| <= z) = ``confidence``.

    ``normal_quantile(0.95) == 1.959963984540054``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a proportion of ``successes`` out of ``n`` trials.

    With p = successes / n and z = :func:`normal_quantile` (``confidence``)::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (lo, hi) = (centre - half, centre + half)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at p = 0 or 1
    (lo is exactly 0.0 when successes == 0, hi exactly 1.0 when successes == n). With ``n == 0``
    nothing was measured and the interval is the whole range ``(0.0, 1.0)``.
    """
    successes, n = _as_int(successes, "successes"), _as_int(n, "n")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    z = normal_quantile(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron 1979) of ``statistic(values)``.

    Draws ``n_resamples`` samples of ``len(values)`` with replacement (``numpy.random.default_rng(seed)``,
    so the result is reproducible), applies ``statistic`` to each, and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those replicas. ``values``
    must be a non-empty 1-D sequence of finite numbers.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D sequence, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("bootstrap_interval needs finite values (got NaN or inf)")
    n_resamples = _as_int(n_resamples, "n_resamples")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    normal_quantile(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    replicas = np.empty(n_resamples, dtype=np.float64)
    for r in range(n_resamples):
        replicas[r] = statistic(data[rng.integers(0, data.size, size=data.size)])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(replicas, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
