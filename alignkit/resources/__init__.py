"""Package data: prompts, bundled evaluation data, the GPT-2 tokenizer used by tiny models."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROMPTS = ROOT / "prompts"
DATA = ROOT / "data"
TOKENIZERS = ROOT / "tokenizers"


def prompt(name: str) -> str:
    """Text of a bundled prompt, e.g. ``prompt("alpaca_sft")`` (file ``prompts/alpaca_sft.prompt``)."""
    path = PROMPTS / f"{name}.prompt"
    if not path.exists():
        valid = sorted(p.stem for p in PROMPTS.glob("*.prompt"))
        raise FileNotFoundError(f"no bundled prompt {name!r}; valid names: {', '.join(valid)}")
    return path.read_text()


def data_path(*parts: str) -> Path:
    """Path of a bundled data file, e.g. ``data_path("gsm8k", "test.jsonl")``."""
    return DATA.joinpath(*parts)
