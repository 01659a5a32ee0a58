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

:func:`run_leaderboard` (``alignkit leaderboard RUN_DIR...``) turns eval runs into battles: every pair of
runs' AlpacaEval outputs judged on their shared instructions in both orders, verdicts cached in the output
folder (``verdicts.jsonl``), then the ranked table, written as Markdown, JSON and a PNG plot.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkit.data.io import (
    read_jsonl,
    read_rows,
    save_figure_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from alignkit.eval.judge import Verdict, pairwise_preference, require_some_valid

__all__ = ["Leaderboard", "bradley_terry", "bradley_terry_with_ci", "load_alpaca_outputs", "run_leaderboard",
           "shared_instructions"]

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


# ============================================================================= a leaderboard of eval runs
# ``alignkit leaderboard RUN_DIR...``: every pair of runs' AlpacaEval outputs judged in both orders
# (the judge's position bias cancels: an example whose two orders disagree is a tie), one battle per
# example and pair, then Bradley-Terry ratings with bootstrap intervals. Verdicts are cached in the
# output folder, keyed by the judge's name and the exact prompt, so a rerun asks the judge nothing new.
ALPACA_DIR = "alpaca_eval"
VERDICTS_FILE = "verdicts.jsonl"


@dataclass(frozen=True)
class RunOutputs:
    """One run's AlpacaEval outputs: ``{example id: (instruction, output)}``, read from ``source``."""

    name: str
    source: Path
    examples: dict[str, tuple[str, str]]


def load_alpaca_outputs(run_dir: str | Path, name: str) -> RunOutputs:
    """A run's AlpacaEval outputs: ``alpaca_eval/predictions.jsonl`` (ids as the runner wrote them), else
    ``alpaca_eval/alpaca_eval_outputs.json`` (the official format: ids are the positions)."""
    folder = Path(run_dir) / ALPACA_DIR
    predictions, official = folder / "predictions.jsonl", folder / "alpaca_eval_outputs.json"
    if predictions.exists():
        rows = read_jsonl(predictions, drop_torn_tail=True)
        pairs = [(str(r["id"]), r["example"]["instruction"], r["output"]) for r in rows]
        source = predictions
    elif official.exists():
        rows = [row.data for row in read_rows(official)]
        pairs = [(str(i), r["instruction"], r["output"]) for i, r in enumerate(rows)]
        source = official
    else:
        raise FileNotFoundError(f"run {name!r} ({run_dir}): no {ALPACA_DIR}/predictions.jsonl or "
                                f"alpaca_eval_outputs.json (run `alignkit eval --tasks alpaca_eval` first)")
    if not pairs:
        raise ValueError(f"run {name!r}: {source} has no AlpacaEval outputs")
    return RunOutputs(name, source, {i: (ins, out) for i, ins, out in pairs})


def shared_instructions(runs: list[RunOutputs]) -> list[tuple[str, str]]:
    """``[(id, instruction)]`` that every run answered, in id order; ``ValueError`` when the runs did not
    answer the same instructions (other ids, or another instruction under the same id)."""
    first = runs[0]
    for run in runs[1:]:
        only_first = sorted(set(first.examples) - set(run.examples), key=_id_order)
        only_run = sorted(set(run.examples) - set(first.examples), key=_id_order)
        if only_first or only_run:
            raise ValueError(
                f"runs {first.name!r} ({len(first.examples)} AlpacaEval examples) and {run.name!r} "
                f"({len(run.examples)}) do not share their instructions: ids only in {first.name!r}: "
                f"{_few(only_first)}; only in {run.name!r}: {_few(only_run)}. Evaluate every run on the same "
                "examples (same --limit) before ranking them")
        for key in first.examples:
            if first.examples[key][0] != run.examples[key][0]:
                raise ValueError(f"example id {key}: runs {first.name!r} and {run.name!r} have different "
                                 f"instructions ({first.examples[key][0][:60]!r} vs {run.examples[key][0][:60]!r}): "
                                 "they were not evaluated on the same AlpacaEval data")
    return [(key, first.examples[key][0]) for key in sorted(first.examples, key=_id_order)]


def _id_order(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def _few(ids: list[str], k: int = 5) -> str:
    return "none" if not ids else ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


class VerdictCache:
    """Single-order pairwise verdicts in ``path`` (JSONL), keyed by judge name + instruction + both outputs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        rows = read_jsonl(self.path, drop_torn_tail=True) if self.path.exists() else []
        self.entries: dict[str, dict] = {r["key"]: r for r in rows}

    @staticmethod
    def key(judge_name: str, instruction: str, output_a: str, output_b: str) -> str:
        blob = json.dumps([judge_name, instruction, output_a, output_b], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = {"key": key, **entry}

    def save(self) -> Path:
        return write_jsonl_atomic(self.path, list(self.entries.values()))


def _judge_order(judge, cache: VerdictCache, items: list[tuple[str, str, str]], meta: list[dict]) -> list[dict]:
    """The cached verdict of every (instruction, output_a, output_b); asks ``judge`` only the missing ones."""
    keys = [VerdictCache.key(judge.name, *item) for item in items]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if todo:
        for i, verdict in zip(todo, judge.pairwise([items[i] for i in todo])):
            cache.put(keys[i], {**meta[i], "judge": judge.name, "label": verdict.label, "raw": verdict.raw})
    return [cache.get(k) for k in keys]


def judge_pair(judge, cache: VerdictCache, a: RunOutputs, b: RunOutputs,
               examples: list[tuple[str, str]]) -> list[dict]:
    """One record per example for runs ``a`` vs ``b``: both single-order verdicts and ``outcome`` =
    P(a wins) from :func:`~alignkit.eval.judge.pairwise_preference` (1, 0.5 when the orders disagree,
    0; None when a verdict is invalid). Raises :class:`~alignkit.eval.judge.JudgeError` when no
    verdict of the pair is valid."""
    meta = [{"id": key, "first": a.name, "second": b.name} for key, _ in examples]
    a_first = _judge_order(judge, cache, [(ins, a.examples[k][1], b.examples[k][1]) for k, ins in examples], meta)
    swapped = [{"id": key, "first": b.name, "second": a.name} for key, _ in examples]
    b_first = _judge_order(judge, cache, [(ins, b.examples[k][1], a.examples[k][1]) for k, ins in examples], swapped)
    cache.save()
    require_some_valid([Verdict(v["label"], v["raw"]) for v in a_first + b_first], "pairwise")
    return [{"id": key, "model_a": a.name, "model_b": b.name, "a_first": v1["label"], "b_first": v2["label"],
             "outcome": pairwise_preference(v1["label"], v2["label"])}
            for (key, _), v1, v2 in zip(examples, a_first, b_first)]


def battles_of(records: list[dict]) -> list[tuple[str, str, float]]:
    """``(model_a, model_b, outcome)`` of every validly judged record (invalid ones are not battles)."""
    return [(r["model_a"], r["model_b"], r["outcome"]) for r in records if r["outcome"] is not None]


def _record_tally(battles: list[tuple[str, str, float]]) -> dict[str, dict[str, int]]:
    tally: dict[str, dict[str, int]] = {}
    for a, b, y in battles:
        for name, score in ((a, y), (b, 1.0 - y)):
            t = tally.setdefault(name, {"wins": 0, "ties": 0, "losses": 0})
            t["wins" if score == 1.0 else "ties" if score == 0.5 else "losses"] += 1
    return tally


@dataclass
class Leaderboard:
    """The ranked table of :func:`run_leaderboard`: ``table`` rows are ``{"rank", "model", "rating", "lo",
    "hi", "games", "wins", "ties", "losses"}``, highest rating first."""

    judge: str
    runs: dict[str, str]
    examples: int
    records: list[dict]
    table: list[dict]
    settings: dict
    new_verdicts: int = 0

    @property
    def invalid(self) -> int:
        return sum(r["outcome"] is None for r in self.records)

    def to_dict(self) -> dict:
        return {"judge": self.judge, "runs": self.runs, "examples": self.examples,
                "battles": len(self.records) - self.invalid, "invalid_judgments": self.invalid,
                "settings": self.settings, "table": self.table}

    def markdown(self) -> str:
        intro = (f"Leaderboard: {len(self.runs)} runs, {self.examples} AlpacaEval instructions, judge `{self.judge}` "
                 f"(both orders; orders that disagree are ties), {len(self.records) - self.invalid} battles, "
                 f"{self.invalid} with an invalid verdict left out. Bradley-Terry ratings (Elo scale, mean "
                 f"{self.settings['base']:g}), 95% bootstrap intervals ({self.settings['n_bootstrap']} replicas).")
        head = [intro, "", "| rank | model | rating | 95% interval | games | wins | ties | losses |",
                "|---|---|---|---|---|---|---|---|"]
        rows = [f"| {r['rank']} | {r['model']} | {r['rating']:.1f} | [{r['lo']:.1f}, {r['hi']:.1f}] | {r['games']} | "
                f"{r['wins']} | {r['ties']} | {r['losses']} |" for r in self.table]
        return "\n".join(head + rows) + "\n"


def rank_table(battles: list[tuple[str, str, float]], *, scale: float = 400.0, base: float = 1000.0,
               l2: float = 1e-3, n_bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """Ranked rows (see :class:`Leaderboard`) from :func:`bradley_terry_with_ci` and the win/tie/loss tally."""
    fitted = bradley_terry_with_ci(battles, scale=scale, base=base, l2=l2, n_bootstrap=n_bootstrap, seed=seed)
    tally = _record_tally(battles)
    return [{"rank": rank, "model": name, **row, **tally[name]} for rank, (name, row) in enumerate(fitted.items(), 1)]


def run_leaderboard(run_dirs: list[str | Path], judge, output: str | Path, *, names: list[str] | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, scale: float = 400.0, base: float = 1000.0,
                    l2: float = 1e-3) -> Leaderboard:
    """Judge every pair of runs on their shared AlpacaEval instructions (``judge``: a
    :class:`~alignkit.eval.judge.Judge`), rank them, and write ``leaderboard.md``, ``leaderboard.json``,
    ``leaderboard.png``, ``battles.jsonl`` and the verdict cache ``verdicts.jsonl`` into ``output``."""
    names = list(names) if names is not None else [Path(d).name or str(d) for d in run_dirs]
    if len(names) != len(run_dirs) or len(set(names)) != len(names):
        raise ValueError(f"the leaderboard needs {len(run_dirs)} distinct run names, got {names}")
    if len(run_dirs) < 2:
        raise ValueError("a leaderboard needs at least two runs")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}")  # before any judge call
    runs = [load_alpaca_outputs(d, n) for d, n in zip(run_dirs, names)]
    examples = shared_instructions(runs)
    output = Path(output)
    cache = VerdictCache(output / VERDICTS_FILE)
    before = len(cache.entries)
    records = [rec for a, b in itertools.combinations(runs, 2) for rec in judge_pair(judge, cache, a, b, examples)]
    settings = {"scale": scale, "base": base, "l2": l2, "n_bootstrap": n_bootstrap, "seed": seed}
    table = rank_table(battles_of(records), **settings)
    board = Leaderboard(judge.name, {r.name: str(r.source.parent.parent) for r in runs}, len(examples), records,
                        table, settings, new_verdicts=len(cache.entries) - before)
    write_leaderboard(board, output)
    return board


def write_leaderboard(board: Leaderboard, output: Path) -> dict[str, Path]:
    """``leaderboard.md``, ``leaderboard.json``, ``battles.jsonl`` and ``leaderboard.png`` in ``output``."""
    return {"markdown": write_text_atomic(output / "leaderboard.md", board.markdown()),
            "json": write_json_atomic(output / "leaderboard.json", board.to_dict()),
            "battles": write_jsonl_atomic(output / "battles.jsonl", board.records),
            "plot": leaderboard_plot(board, output / "leaderboard.png")}


def leaderboard_plot(board: Leaderboard, path: Path) -> Path:
    """Ratings with their 95% intervals, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board.table
    y = np.arange(len(rows))[::-1]
    rating = np.array([r["rating"] for r in rows])
    err = np.array([[r["rating"] - r["lo"] for r in rows], [r["hi"] - r["rating"] for r in rows]])
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.5 * len(rows)))
    ax.errorbar(rating, y, xerr=err, fmt="o", capsize=4)
    ax.axvline(board.settings["base"], color="gray", lw=0.8, ls="--")
    ax.set_yticks(y, [f"{r['model']} ({r['games']} games)" for r in rows])
    ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    ax.set_title(f"AlpacaEval pairwise, judge {board.judge}", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path
