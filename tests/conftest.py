"""Shared fixtures. Tests run offline, on CPU, with tiny random models built from a config."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")

import json
from pathlib import Path

import pytest
import torch

from alignkit.resources import ROOT as RESOURCES

# Tiny models run fastest single-threaded (thread hand-off dominates); real-model tests get every core
# (_real_model_threads), as the README's commands do.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)

GPT2_DIR = RESOURCES / "tokenizers" / "gpt2"
TINY_CONFIG = RESOURCES / "tiny_llama_config.json"


def build_tiny_llama(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer, hidden-32 Llama with the GPT-2 tokenizer, saved as an ordinary model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(GPT2_DIR)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(autouse=True)
def _real_model_threads(request):
    """Tests marked ``real_model`` (SmolLM2-135M in this process) run with torch's default thread count (one
    per core) instead of the single thread the tiny models get; the count is restored afterwards."""
    if request.node.get_closest_marker("real_model") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Llama + GPT-2 tokenizer (read-only by convention: copy to modify)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def load_stage(tmp_path: Path, stage: str, yaml_text: str, overrides=()):
    """Write ``yaml_text`` as ``<stage>.yaml`` in ``tmp_path`` and load it (output under ``tmp_path/out``);
    returns the StageRecipe of ``stage``."""
    from alignkit.config import load_recipe

    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml_text)
    return load_recipe(path, [f"output_dir={tmp_path / 'out'}", *overrides]).stages[stage]


class ReplyGenerator:
    """A Generator stand-in answering ``reply(prompt)`` for every prompt (an evaluated model or a judge)."""

    def __init__(self, reply, name):
        self.reply, self.name = reply, name

    def generate(self, prompts, params):
        from alignkit.generation.base import Completion

        return [Completion(self.reply(p), token_ids=[1]) for p in prompts]

    def chat(self, conversations, params):
        return self.generate([c[-1]["content"] for c in conversations], params)

    def update_weights(self, model):
        pass
