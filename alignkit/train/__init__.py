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

    * ``stage`` (str), ``seed`` (int), ``resume`` (bool, default True: a rerun continues the current
      attempt from its newest complete checkpoint in ``stage_dir``; see docs/resume.md),
    * ``model`` (``ModelArgs``: name_or_path, dtype, attn_implementation, quantization, revision,
      gguf_file),
    * ``data`` (``DataArgs``: path, split, format, columns, eval_path, eval_split, val_size,
      max_rows, max_length, packing, template),
    * ``lora`` (``LoraArgs``: enabled, r, alpha, dropout, target_modules, ...),
    * ``train`` (an ``ARGS_CLASS`` instance; ``output_dir`` is already set to ``stage_dir``),
    * ``extras`` (dict: any stage-specific section that is not one of the above),
    * ``user_keys`` (frozenset of the dotted keys the user set) and ``previous`` (see ``ignored_keys``).

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

``DATA_KEYS`` (optional)
    ``frozenset`` of the ``data:`` field names the stage reads (``{"path", "split", ...}``). When a
    module declares it, :func:`alignkit.config.ignored_settings` refuses every other ``data.*`` key
    the user sets, naming the stages whose ``DATA_KEYS`` hold it. Without it the module's
    ``ignored_keys`` is the only data rule.

``ignored_keys(stage) -> dict[str, str]`` (optional)
    ``stage`` is the built :class:`alignkit.config.StageRecipe` (typed sections, ``user_keys``: the
    dotted keys the user set, ``previous``: the chain's previous training stage or None). Returns
    ``{dotted_key: message}`` for every key (``"train.label_smoothing"``, ``"data.template"``) that the
    path this configuration selects does NOT read, whether the user set it or not (the loader keeps
    those in ``stage.user_keys``; ``StageRecipe.to_dict`` leaves them all out of ``resolved_config.yaml``).
    The message is one line that names the key, the path that ignores it and the paths that would read
    it, e.g. ``train.label_smoothing is read by losses cdpo, robust, simpo and trl (...); this recipe's
    loss is dpo``. It must be cheap and pure (no model, no data, no I/O): it runs while the recipe is
    loaded, before anything else, and again when the resolved config is written. A key the user set
    equal to its default still counts as set. Keys the loader forces (output_dir, seed, use_cpu, bf16)
    are not user keys. The generic rules of :mod:`alignkit.config` (lora off, ``DATA_KEYS``, a chain's
    later stage and the first stage's model keys) are added to it; the module lists only its own.

The pipeline (:mod:`alignkit.pipeline`) writes ``resolved_config.yaml`` and the ``DONE`` state.
"""
from __future__ import annotations

from types import ModuleType

from alignkit.train import dpo, grpo, kto, ppo, reward, sft

# stage name -> stage module (each keeps the contract above)
STAGES: dict[str, ModuleType] = {"sft": sft, "dpo": dpo, "reward": reward, "grpo": grpo, "ppo": ppo, "kto": kto}


def get_stage_module(name: str) -> ModuleType:
    """The stage module for ``name``; a clear error lists the valid stage names."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    module = STAGES[name]
    for attr in ("ARGS_CLASS", "run"):
        if not hasattr(module, attr):
            raise TypeError(f"stage module {module.__name__} lacks {attr!r} (see alignkit/train/__init__.py)")
    return module
