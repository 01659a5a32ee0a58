"""Bradley-Terry ratings against closed forms, the likelihood's own stationarity (computed here from the raw
battles in float64), symmetries and bootstrap invariants."""
from __future__ import annotations

import math
import random

import pytest

from alignkit.eval.leaderboard import bradley_terry, bradley_terry_with_ci

LN10 = math.log(10.0)


def games(a: str, b: str, a_wins: int, b_wins: int, ties: int = 0) -> list[tuple[str, str, float]]:
    return [(a, b, 1.0)] * a_wins + [(a, b, 0.0)] * b_wins + [(a, b, 0.5)] * ties


def loglik_gradient(battles, ratings, scale=400.0):
    """d/dtheta of sum_battles [y log p + (1 - y) log(1 - p)], theta = R ln10 / scale, one battle at a time."""
    grad = dict.fromkeys(ratings, 0.0)
    for a, b, y in battles:
        p = 1.0 / (1.0 + 10.0 ** ((ratings[b] - ratings[a]) / scale))
        grad[a] += y - p
        grad[b] -= y - p
    return grad


def random_battles(seed: int, n_models: int = 5, n: int = 200):
    rng = random.Random(seed)
    strength = {f"m{i}": rng.gauss(0, 1) for i in range(n_models)}
    names = sorted(strength)
    battles = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p = 1 / (1 + math.exp(strength[b] - strength[a]))
        u = rng.random()
        battles.append((a, b, 0.5 if abs(u - p) < 0.05 else float(u < p)))
    return battles


# ----------------------------------------------------------------------------- closed forms
def test_two_models_closed_form():
    ratings = bradley_terry(games("a", "b", 7, 3), l2=0)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(7 / 3), abs=1e-8)
    assert (ratings["a"] + ratings["b"]) / 2 == pytest.approx(1000.0, abs=1e-9)
    assert list(ratings) == ["a", "b"]


def test_ties_count_half_a_win_each():
    ratings = bradley_terry(games("a", "b", 5, 3, ties=2), l2=0)  # 6 of 10 wins for a
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(6 / 4), abs=1e-8)
    even = bradley_terry(games("a", "b", 0, 0, ties=4) + games("b", "c", 0, 0, ties=3), l2=0)
    assert all(r == pytest.approx(1000.0, abs=1e-9) for r in even.values())


def test_three_models_hand_checked():
    # strengths 4 : 2 : 1 give P(A>B) = 2/3, P(B>C) = 2/3, P(A>C) = 4/5; these counts match them
    # exactly, so every model's wins equal its expected wins at those strengths: they are the MLE.
    battles = games("A", "B", 20, 10) + games("C", "B", 10, 20) + games("A", "C", 24, 6)
    ratings = bradley_terry(battles, l2=0)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(2), abs=1e-8)
    assert ratings["B"] - ratings["C"] == pytest.approx(400 * math.log10(2), abs=1e-8)
    assert ratings["B"] == pytest.approx(1000.0, abs=1e-8)  # log-strengths 2, 1, 0 (x log 2): B is the mean
    assert list(ratings) == ["A", "B", "C"]


def test_gradient_of_the_likelihood_vanishes_at_the_ratings():
    battles = games("x", "y", 6, 2, ties=1) + games("y", "z", 3, 4) + games("z", "x", 2, 5, ties=2)
    ratings = bradley_terry(battles, l2=0)
    assert max(abs(g) for g in loglik_gradient(battles, ratings).values()) < 1e-8
    nudged = dict(ratings, x=ratings["x"] + 5.0)
    assert abs(loglik_gradient(battles, nudged)["x"]) > 1e-2  # the check can fail


def test_matches_hunters_mm_algorithm():
    # Hunter 2004, eq. (3): pi_i <- W_i / sum_j N_ij / (pi_i + pi_j), an independent fixed-point iteration
    battles = random_battles(5, n_models=6, n=400)
    names = sorted({a for a, _, _ in battles} | {b for _, b, _ in battles})
    wins = dict.fromkeys(names, 0.0)
    meetings: dict[tuple[str, str], int] = {}
    for a, b, y in battles:
        wins[a] += y
        wins[b] += 1 - y
        meetings[(a, b)] = meetings.get((a, b), 0) + 1
        meetings[(b, a)] = meetings.get((b, a), 0) + 1
    pi = dict.fromkeys(names, 1.0)
    for _ in range(5000):
        pi = {i: wins[i] / sum(n / (pi[i] + pi[j]) for (k, j), n in meetings.items() if k == i) for i in names}
        geo = math.exp(sum(math.log(v) for v in pi.values()) / len(pi))
        pi = {i: v / geo for i, v in pi.items()}
    ratings = bradley_terry(battles, l2=0)
    for name in names:
        assert ratings[name] == pytest.approx(1000.0 + 400 * math.log10(pi[name]), abs=1e-6)


def test_default_prior_is_stationary_for_the_penalised_likelihood_and_tiny():
    battles = random_battles(0)
    ratings = bradley_terry(battles)  # l2 = 1e-3
    grad = loglik_gradient(battles, ratings)
    for name, r in ratings.items():
        assert grad[name] == pytest.approx(1e-3 * (r - 1000.0) * LN10 / 400, abs=1e-8)
    exact = bradley_terry(battles, l2=0)
    assert max(abs(ratings[m] - exact[m]) for m in exact) < 0.5


# ----------------------------------------------------------------------------- finite ratings
def test_undefeated_model_stays_finite_with_the_prior_and_is_refused_without():
    battles = games("champ", "a", 5, 0) + games("champ", "b", 3, 0) + games("a", "b", 4, 2)
    ratings = bradley_terry(battles)
    assert all(math.isfinite(r) for r in ratings.values())
    assert list(ratings) == ["champ", "a", "b"] and ratings["champ"] - ratings["a"] > 400
    grad = loglik_gradient(battles, ratings)
    for name, r in ratings.items():
        assert grad[name] == pytest.approx(1e-3 * (r - 1000.0) * LN10 / 400, abs=1e-8)
    with pytest.raises(ValueError, match="l2=0"):
        bradley_terry(battles, l2=0)
    with pytest.raises(ValueError, match="l2=0"):
        bradley_terry(games("a", "b", 0, 3) + games("b", "c", 2, 2), l2=0)  # a lost everything


def test_chain_of_sweeps_converges():
    battles = games("a", "b", 10, 0) + games("b", "c", 10, 0) + games("c", "d", 10, 0)
    ratings = bradley_terry(battles)
    assert list(ratings) == ["a", "b", "c", "d"]
    assert sum(ratings.values()) / 4 == pytest.approx(1000.0, abs=1e-8)


def test_disconnected_models_are_refused():
    with pytest.raises(ValueError, match="never compared"):
        bradley_terry(games("a", "b", 2, 1) + games("c", "d", 1, 2))


# ----------------------------------------------------------------------------- invariants
def test_swapping_sides_order_and_names_changes_nothing():
    battles = random_battles(1)
    ratings = bradley_terry(battles)
    swapped = bradley_terry([(b, a, 1.0 - y) for a, b, y in battles])
    shuffled = list(battles)
    random.Random(2).shuffle(shuffled)
    for other in (swapped, bradley_terry(shuffled)):
        assert other.keys() == ratings.keys()
        assert all(other[m] == pytest.approx(ratings[m], abs=1e-7) for m in ratings)


def test_mean_is_base_and_scale_stretches_differences():
    battles = random_battles(3, n_models=7, n=300)
    ratings = bradley_terry(battles, base=1500.0)
    assert sum(ratings.values()) / len(ratings) == pytest.approx(1500.0, abs=1e-8)
    half = bradley_terry(battles, scale=200.0, base=0.0)
    assert all(half[m] == pytest.approx((ratings[m] - 1500.0) / 2, abs=1e-7) for m in ratings)
    assert list(ratings.values()) == sorted(ratings.values(), reverse=True)


def test_more_wins_raise_the_gap():
    base = games("a", "b", 5, 5) + games("b", "c", 5, 5) + games("a", "c", 5, 5)
    before = bradley_terry(base)
    after = bradley_terry(base + games("a", "b", 1, 0))
    assert after["a"] - after["b"] > before["a"] - before["b"]
    assert after["a"] > after["c"] > after["b"]  # a beat b: b falls below the untouched c


@pytest.mark.parametrize(
    ("battle", "error", "match"),
    [(("a", "b", 2.0), ValueError, "outcome 2.0"), (("a", "b", 0.3), ValueError, "outcome 0.3"),
     (("a", "b", True), ValueError, "outcome True"), (("a", "b", "1"), ValueError, "outcome '1'"),
     (("a", "a", 1.0), ValueError, "itself"), (("a", "b"), ValueError, "expected"),
     ((1, "b", 1.0), TypeError, "strings")],
)
def test_battles_are_validated(battle, error, match):
    with pytest.raises(error, match=match):
        bradley_terry([("a", "b", 1.0), battle])


def test_no_battles_and_negative_prior_are_refused():
    with pytest.raises(ValueError, match="at least one battle"):
        bradley_terry([])
    with pytest.raises(ValueError, match="l2"):
        bradley_terry(games("a", "b", 1, 1), l2=-1.0)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_data():
    battles = games("A", "B", 20, 10) + games("C", "B", 10, 20) + games("A", "C", 24, 6)
    table = bradley_terry_with_ci(battles, n_bootstrap=300)
    point = bradley_terry(battles)
    assert list(table) == list(point)
    for name, row in table.items():
        assert row["rating"] == point[name]
        assert row["lo"] < row["rating"] < row["hi"]
        assert row["games"] == 60
    big = bradley_terry_with_ci(battles * 10, n_bootstrap=300)
    for name in table:
        assert big[name]["hi"] - big[name]["lo"] < 0.5 * (table[name]["hi"] - table[name]["lo"])
    assert bradley_terry_with_ci(battles, n_bootstrap=50, seed=4) == bradley_terry_with_ci(
        battles, n_bootstrap=50, seed=4
    )


def test_bootstrap_two_model_width_matches_the_delta_method():
    battles = games("a", "b", 60, 40)
    row = bradley_terry_with_ci(battles, l2=0, n_bootstrap=2000)["a"]
    # R_a = 1000 + (200/ln10) logit(p); se(p) = sqrt(p(1-p)/n); d logit / dp = 1 / (p(1-p))
    se = 200 / LN10 / math.sqrt(0.6 * 0.4 * 100)
    assert row["hi"] - row["lo"] == pytest.approx(2 * 1.959963984540054 * se, rel=0.15)


def test_bootstrap_validates():
    with pytest.raises(ValueError, match="n_bootstrap"):
        bradley_terry_with_ci(games("a", "b", 1, 1), n_bootstrap=0)
    with pytest.raises(ValueError, match="confidence"):
        bradley_terry_with_ci(games("a", "b", 1, 1), confidence=1.5)
    with pytest.raises(ValueError, match="l2=0"):
        bradley_terry_with_ci(games("a", "b", 1, 1), l2=0, n_bootstrap=200)  # some replica sweeps
