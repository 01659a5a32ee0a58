"""Training stages: one thin module per stage, on top of TRL's trainers.

Stage-module contract (every ``alignkit/train/<stage>.py`` in :data:`STAGES` keeps it)
-----------------------------------------------------------------------------------
``ARGS_CLASS``
    The dataclass of the recipe's ``train:`` section. For TRL stages a subclass of the TRL config
    (``SFTConfig``, ``DPOConfig``, ``RewardConfig``) whose fields map 1:1 to YAML keys, plus alignkit
    fields, each with ``metadata={"help": ...}``. GRPO: alignkit's ``GRPOArgs`` (plain dataclass).
    :mod:`alignkit.config` builds it from YAML + dotted overrides (type conversion from the field
    types, unknown keys rejected); the stage never reads YAML.

``run(recipe, stage_dir, model_path) -> dict``
    ``recipe`` is an :class:`alignkit.config.StageRecipe` with attributes

    * ``stage`` (str), ``seed`` (int), ``resume`` (bool: continue from the last checkpoint in
      ``stage_dir``),
    * ``model`` (``ModelArgs``: name_or_path, dtype, attn_implementation, quantization, revision,
      gguf_file),
    * ``data`` (``DataArgs``: path, split, format, columns, eval_path, eval_split, val_size,
      max_rows, max_length, packing, template),
    * ``lora`` (``LoraArgs``: enabled, r, alpha, dropout, target_modules, ...),
    * ``train`` (an ``ARGS_CLASS`` instance; ``output_dir`` is already set to ``stage_dir``),
    * ``extras`` (dict: any stage-specific section that is not one of the above).

    ``stage_dir`` (``pathlib.Path``) exists and is where every output goes. ``model_path`` is the
    model to start from: the previous stage's output model folder in a chain, else ``None``
    (then use ``recipe.model.name_or_path``). Load it with :func:`alignkit.models.load_model`.

    Returns a JSON-serialisable dict with at least::

        {"model_dir": str,          # a full model folder the next stage / eval can load
         "metrics": {...},          # final train/eval metrics (floats)
         "model_source": {...}}     # ModelSource.to_dict() of the model actually loaded

    and optionally ``"adapter_dir"`` (LoRA adapter + tokenizer) and ``"interrupted": True`` when the
    run stopped on Ctrl-C after saving a checkpoint (the pipeline then does not mark it done).
    Writers: ``stage_dir/metrics.jsonl`` (one JSON object per log line) and
    ``stage_dir/curves.png`` (see :mod:`alignkit.train.callbacks`).

The pipeline (:mod:`alignkit.pipeline`) writes ``resolved_config.yaml`` and the ``DONE`` state.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# stage name -> module path (each module keeps the contract above)
STAGES: dict[str, str] = {
    "sft": "alignkit.train.sft",
    "dpo": "alignkit.train.dpo",
    "reward": "alignkit.train.reward",
    "grpo": "alignkit.train.grpo",
}


def get_stage_module(name: str) -> ModuleType:
    """Import the stage module for ``name``; a clear error lists the valid stage names."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    module = importlib.import_module(STAGES[name])
    for attr in ("ARGS_CLASS", "run"):
        if not hasattr(module, attr):
            raise TypeError(f"stage module {STAGES[name]} lacks {attr!r} (see alignkit/train/__init__.py)")
    return module
