"""Bradley-Terry ratings on the Elo scale from pairwise battles, with bootstrap intervals.

A battle is ``(model_a, model_b, outcome)`` with outcome 1.0 (a wins), 0.0 (b wins) or 0.5 (a tie,
counted as half a win for each side). The Bradley-Terry model (Bradley & Terry 1952) says::

    P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / scale)) = sigmoid(theta_a - theta_b),
    theta = (R - base) * ln(10) / scale

:func:`bradley_terry` returns the maximum-likelihood ratings (the Chatbot Arena convention, Chiang et
al. 2024), shifted so that their mean is ``base``; :func:`bradley_terry_with_ci` adds percentile
bootstrap intervals. The fit is Newton's method on the log-likelihood, which is concave in theta
(Hunter 2004, "MM algorithms for generalized Bradley-Terry models", gives the MM alternative and
restates Ford 1957's condition for the maximum to exist). Pure numpy; no torch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["bradley_terry", "bradley_terry_with_ci"]

_OUTCOMES = (0.0, 0.5, 1.0)
_SLOT = {1.0: 0, 0.5: 1, 0.0: 2}  # outcome for the lower-index model -> [wins, ties, losses] column


def _tally(battles: Iterable[tuple[str, str, float]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted model names, the (i, j) index pairs (i < j) that met, and per pair the counts of
    [i wins, ties, j wins]."""
    rows = []
    for index, battle in enumerate(battles):
        try:
            a, b, outcome = battle
        except (TypeError, ValueError):
            raise ValueError(f"battle {index}: expected (model_a, model_b, outcome), got {battle!r}") from None
        if not isinstance(a, str) or not isinstance(b, str):
            raise TypeError(f"battle {index}: model names must be strings, got {a!r} and {b!r}")
        if a == b:
            raise ValueError(f"battle {index}: a model cannot battle itself ({a!r} vs {b!r})")
        if isinstance(outcome, bool) or not isinstance(outcome, (int, float)) or outcome not in _OUTCOMES:
            raise ValueError(f"battle {index}: outcome {outcome!r} is not 1.0 (a wins), 0.0 (b wins) or 0.5 (tie)")
        rows.append((a, b, float(outcome)))
    if not rows:
        raise ValueError("bradley_terry needs at least one battle")
    names = sorted({a for a, _, _ in rows} | {b for _, b, _ in rows})
    pos = {name: i for i, name in enumerate(names)}
    counts: dict[tuple[int, int], list[int]] = {}
    for a, b, outcome in rows:
        i, j = pos[a], pos[b]
        if i > j:
            i, j, outcome = j, i, 1.0 - outcome
        counts.setdefault((i, j), [0, 0, 0])[_SLOT[outcome]] += 1
    pairs = np.array(sorted(counts), dtype=np.int64).reshape(-1, 2)
    return names, pairs, np.array([counts[tuple(p)] for p in pairs], dtype=np.float64)


def _wins(n_models: int, pairs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """W[i, j]: i's wins over j, a tie adding half a win to each side."""
    wins = np.zeros((n_models, n_models))
    np.add.at(wins, (pairs[:, 0], pairs[:, 1]), counts[:, 0] + counts[:, 1] / 2)
    np.add.at(wins, (pairs[:, 1], pairs[:, 0]), counts[:, 2] + counts[:, 1] / 2)
    return wins


def _reachable(adjacency: np.ndarray) -> np.ndarray:
    """Nodes reachable from node 0 along the directed edges of a boolean adjacency matrix."""
    seen = np.zeros(len(adjacency), dtype=bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = adjacency[frontier].any(axis=0) & ~seen
        seen |= frontier
    return seen


def _check_graph(names: list[str], wins: np.ndarray, l2: float) -> None:
    """Refuse fits whose ratings are not identified by the data (see :func:`bradley_terry`)."""
    games = wins + wins.T
    apart = ~_reachable(games > 0)
    if apart.any():
        apart_names = ", ".join(n for n, a in zip(names, apart) if a)
        raise ValueError(
            f"models {apart_names} are never compared with {names[0]}, directly or through other models: "
            "their ratings are not comparable; add battles that connect them"
        )
    if l2 == 0.0:
        beaten = wins > 0  # edge i -> j: i took at least half a win from j
        if not (_reachable(beaten).all() and _reachable(beaten.T).all()):
            raise ValueError(
                "with l2=0 the maximum-likelihood ratings do not exist: some group of models never lost "
                "(or never won) a game against the rest, so their ratings diverge; use l2 > 0"
            )


def _fit(wins: np.ndarray, l2: float, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """theta maximising sum_ij W_ij log sigmoid(theta_i - theta_j) - l2/2 |theta|^2, with mean 0.

    Newton steps with step halving; the gauge term (sum theta)^2 / 2 makes the Hessian definite
    when l2 == 0 without moving the optimum (whose gradient already sums to zero).
    """
    games = wins + wins.T
    theta = np.zeros(len(wins))

    def objective(t: np.ndarray) -> float:
        diff = t[:, None] - t[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum() - l2 / 2 * t @ t - t.sum() ** 2 / 2)

    value = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
        grad = (wins - games * p).sum(axis=1) - l2 * theta - theta.sum()
        curvature = games * p * p.T
        hessian = np.diag(curvature.sum(axis=1) + l2) - curvature + 1.0
        step = np.linalg.solve(hessian, grad)
        shrink = 1.0
        while objective(theta + shrink * step) < value - 1e-12 * abs(value) and shrink > 1e-8:
            shrink /= 2
        theta = theta + shrink * step
        value = objective(theta)
        if np.max(np.abs(shrink * step)) < tol:
            return theta - theta.mean()
    raise RuntimeError(f"Bradley-Terry fit did not converge in {max_iter} Newton steps")


def _prepare(battles, l2: float) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Validated names, pairs, per-pair counts and the win matrix of ``battles``."""
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    names, pairs, counts = _tally(battles)
    wins = _wins(len(names), pairs, counts)
    _check_graph(names, wins, l2)
    return names, pairs, counts, wins


def _ratings(theta: np.ndarray, scale: float, base: float) -> np.ndarray:
    return base + theta * scale / math.log(10.0)


def _ranked(names: list[str], ratings: np.ndarray) -> list[int]:
    return sorted(range(len(names)), key=lambda i: (-ratings[i], names[i]))


def bradley_terry(
    battles: Iterable[tuple[str, str, float]], *, scale: float = 400.0, base: float = 1000.0, l2: float = 1e-3
) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale: ``{model: rating}``, highest first, mean ``base``.

    Maximises the log-likelihood sum over battles of
    ``outcome * log P(a beats b) + (1 - outcome) * log P(b beats a)`` with
    P(a beats b) = 1 / (1 + 10^((R_b - R_a) / scale)); so for two models where a won w of n games,
    R_a - R_b = scale * log10(w / (n - w)).

    Finite ratings: a model that won (or lost) every game has an infinite MLE. By default a tiny
    Gaussian prior keeps every rating finite: ``l2 / 2 * sum(theta^2)`` is subtracted from the
    log-likelihood, theta = (R - base) * ln(10) / scale, i.e. a N(0, 1/l2) prior on theta (standard
    deviation ~5,500 Elo points at l2=1e-3, scale=400). It moves ordinary ratings by a few hundredths
    of a point; an undefeated model lands far above the rest, but finite. ``l2=0`` gives the exact
    MLE and refuses (``ValueError``) data where it does not exist (Hunter 2004's condition: in every
    split of the models into two groups, each group took at least a half win from the other).
    Models never connected by battles, directly or through others, are refused whatever ``l2``.
    Raises ``ValueError`` for an outcome outside {0, 0.5, 1}, a model battling itself, or no battles.
    """
    names, _, _, wins = _prepare(battles, l2)
    ratings = _ratings(_fit(wins, l2), scale, base)
    return {names[i]: float(ratings[i]) for i in _ranked(names, ratings)}


def _resample(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One stratified bootstrap replica: each pair keeps its number of games and redraws their
    outcomes (win / tie / loss) from its observed frequencies, so no model or pair drops out."""
    n = counts.sum(axis=1)
    return rng.multinomial(n.astype(np.int64), counts / n[:, None]).astype(np.float64)


def bradley_terry_with_ci(
    battles: Iterable[tuple[str, str, float]],
    *,
    scale: float = 400.0,
    base: float = 1000.0,
    l2: float = 1e-3,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`bradley_terry` ratings with percentile bootstrap intervals, highest rating first:
    ``{model: {"rating", "lo", "hi", "games"}}``.

    ``rating`` is the fit on all battles (identical to :func:`bradley_terry`); ``lo``/``hi`` are the
    ``(1 -/+ confidence) / 2`` quantiles of the ratings refitted on ``n_bootstrap`` replicas
    (``numpy.random.default_rng(seed)``, reproducible). Replicas are stratified by pair: every pair of
    models keeps its number of games and redraws win/tie/loss from its observed frequencies, so no
    model drops out of a replica. ``games`` is the number of battles the model played.

    A pair whose games all went one way redraws that same result in every replica, so the interval
    of a model that swept its opponents reflects only the other pairs' uncertainty (and the prior):
    read it as "few games", not as precision. With ``l2=0`` a replica without an MLE is refused.
    """
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    names, pairs, counts, wins = _prepare(battles, l2)
    point = _ratings(_fit(wins, l2), scale, base)
    rng = np.random.default_rng(seed)
    replicas = np.empty((n_bootstrap, len(names)))
    for r in range(n_bootstrap):
        replica = _wins(len(names), pairs, _resample(counts, rng))
        try:
            _check_graph(names, replica, l2)
        except ValueError:
            raise ValueError(f"bootstrap replica {r} has no maximum-likelihood ratings with l2=0; use l2 > 0") from None
        replicas[r] = _ratings(_fit(replica, l2), scale, base)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(replicas, [alpha, 1.0 - alpha], axis=0)
    games = np.rint(wins + wins.T).sum(axis=1).astype(np.int64)
    return {
        names[i]: {"rating": float(point[i]), "lo": float(lo[i]), "hi": float(hi[i]), "games": int(games[i])}
        for i in _ranked(names, point)
    }
