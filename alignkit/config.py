"""Recipes: typed stage configs from YAML plus dotted ``key=value`` overrides.

This is the only layer that reads YAML. A recipe describes one stage (``stage: sft``) or a chain
(``stages: [sft, dpo, eval]``). Sections:

* ``model`` -> :class:`ModelArgs`, ``data`` -> :class:`DataArgs`, ``lora`` -> :class:`LoraArgs`,
* ``train`` -> the stage module's ``ARGS_CLASS`` (TRL config subclass: fields 1:1),
* ``eval`` -> :class:`EvalArgs` (chains only),
* in a chain, one section per stage (``sft: {model:, data:, lora:, train:}``) deep-merged over the
  top-level ``model``/``data``/``lora`` defaults.

Overrides address the same tree: ``train.learning_rate=1e-6 lora.r=32 dpo.train.beta=0.2``. Values
are parsed as YAML 1.2 (``no``/``yes``/``on``/``off`` are strings, ``true``/``false`` booleans, ``1e-6`` a
float; :class:`Yaml12Loader`, also used for recipe files) and converted to the dataclass field type;
unknown keys and wrong types raise :class:`RecipeError` naming the recipe file, the key path and the valid keys.

Nothing silently ignored: every key the user set (YAML + overrides) must be read by the path the recipe
selects. :func:`ignored_settings` collects the keys a stage does not read (generic rules here for
``model``/``data``/``lora``, plus the stage module's ``ignored_keys(stage)``) and :func:`check_strict`
refuses the user's keys among them before any model loads, e.g. ``train.label_smoothing is read by losses
cdpo, robust, simpo and trl (...); this recipe's loss is dpo``.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from alignkit.data.io import write_text_atomic
from alignkit.eval.config import EvalConfig, is_set, problems, unread
from alignkit.models import DEFAULT_MODEL
from alignkit.train import STAGES, get_stage_module

SECTIONS = ("model", "data", "lora", "train")
TOP_LEVEL_KEYS = ("stage", "stages", "output_dir", "seed", "resume", "description", "eval", *SECTIONS)


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be turned into typed configs."""


# ------------------------------------------------------------------------------------------------
# YAML 1.2 scalars
# ------------------------------------------------------------------------------------------------
class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's plain scalars instead of YAML 1.1's.

    ``true``/``false`` (any of True/TRUE) are booleans, ``yes``/``no``/``on``/``off`` stay strings (so
    ``train.save_strategy=no`` is the string ``no``); integers are decimal (``010`` is 10), ``0o``-octal or
    ``0x``-hex, no ``1:30`` sexagesimal; ``1e-6`` is a float; ``2024-01-01`` a string (no timestamps). Bool fields still accept yes/no via :func:`coerce`.
    """


_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), "-+.0123456789")):
    Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    if text[:2] in ("0o", "0x"):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text)


def _yaml12_float(loader, node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") == ".inf":
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def yaml12_load(text: str):
    """``yaml.safe_load`` with YAML 1.2 scalars (:class:`Yaml12Loader`)."""
    return yaml.load(text, Loader=Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects


# ------------------------------------------------------------------------------------------------
# Section dataclasses
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """Which model to start from and how to load it (passed to ``alignkit.models.load_model``)."""

    name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Hub name, local folder or .gguf file. The default resolves offline to the packaged GGUF."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights dtype: auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16, float16."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel: eager, sdpa, flash_attention_2, or sdpa_varlen (alignkit.attention: SDPA "
                "per document, for padding-free batches without flash-attn). None: transformers' default."})
    quantization: str | None = field(default=None, metadata={
        "help": "None, 4bit (QLoRA: NF4 + double quantization) or 8bit (bitsandbytes).",
        "choices": [None, "4bit", "8bit"]})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file name inside name_or_path (a folder or hub repo of GGUF files)."})


@dataclass
class DataArgs:
    """Where the training data comes from and how it is checked and split."""

    path: str | None = field(default=None, metadata={
        "help": "A .jsonl/.jsonl.gz/.json/.parquet/.csv file, a folder of those, a hub dataset name, or "
                "quickstart:<name> (built by alignkit.train.quickstart)."})
    split: str = field(default="train", metadata={"help": "Split to read (folders and hub datasets)."})
    format: str = field(default="auto", metadata={
        "help": "Preference format (dpo, reward): auto, prompt_chosen_rejected, conversational, hh. An SFT "
                "recipe that sets it is refused."})
    columns: dict[str, str] | None = field(default=None, metadata={
        "help": "Column mapping, e.g. {prompt: question, chosen: good, rejected: bad}."})
    eval_path: str | None = field(default=None, metadata={
        "help": "Validation data (same formats). None: eval_split of path, or val_size held out."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split of `path` used for validation when eval_path is None (e.g. test)."})
    val_size: float = field(default=0.0, metadata={
        "help": "Hold out this fraction (<1) or number (>=1) of training rows for validation."})
    max_rows: int | None = field(default=None, metadata={
        "help": "Read only the first N training records (bad ones included): the report says read N."})
    on_error: str = field(default="raise", metadata={
        "help": "Malformed rows (bad JSON, missing field, wrong type, undecodable bytes, a cut .gz): raise (stop "
                "before training, naming file, line and field) or drop (leave them out, counted in the data "
                "check report). Rows dropped for a reason (empty text, chosen == rejected, duplicate, over "
                "max length) are always left out. `alignkit data check` reaches the same verdict.",
        "choices": ["raise", "drop"]})
    decontaminate: bool = field(default=False, metadata={
        "help": "Drop training rows whose prompt or response equals (after normalisation) or nearly equals "
                "(word 3-gram Jaccard >= 0.6, MinHash LSH) a question of the bundled eval sets (GSM8K test, "
                "MMLU test, AlpacaEval, SimpleSafetyTests); the data check report lists them."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_length: int | None = field(default=None, metadata={
        "help": "Token limit for the data check (rows longer are dropped); None: train.max_length. Unread "
                "(refused) when SFT packs: packed rows are concatenated and cut, not dropped."})
    packing: str | None = field(default=None, metadata={
        "help": "SFT only: 'alignkit' packs with alignkit.data.PackedSFTDataset (Alpaca template, loss on "
                "every token); for TRL's packing set train.packing=true instead.",
        "choices": [None, "alignkit"]})
    template: str | None = field(default=None, metadata={
        "help": "Prompt formatting: None (rows as they are; message lists get the model's chat template), "
                "chat (plain-text rows become user/assistant messages: the model's chat template), or a "
                "text template: a bundled prompt name (alpaca_sft) or a string with {instruction}/{response}."})


@dataclass
class LoraArgs:
    """LoRA / QLoRA adapter settings (a ``peft.LoraConfig``; QLoRA = this + model.quantization=4bit)."""

    enabled: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (lora_alpha)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "Module names to adapt, or 'all-linear' (every linear layer except the output head)."})
    bias: str = field(default="none", metadata={"help": "none, all or lora_only.",
                                                "choices": ["none", "all", "lora_only"]})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. score for reward models)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})


@dataclass
class EvalArgs(EvalConfig):
    """The chain's ``eval`` stage: an :class:`~alignkit.eval.config.EvalConfig` (every setting of
    ``alignkit eval``: tasks, judge, backend/base_url, HTTP options, resume, harness, ...) run on the
    starting model (before) and the final model (after), plus the chain-only fields below."""

    model: str | None = field(default=None, metadata={
        "help": "Set by the chain (the starting model, then the final model); not a recipe key."})
    output: str | None = field(default=None, metadata={
        "help": "Set by the chain (<output_dir>/<n>_eval/before|after); not a recipe key."})
    seed: int | None = field(default=None, metadata={
        "help": "Set by the chain (the recipe's top-level seed); not a recipe key."})
    include_base: bool = field(default=True, metadata={"help": "Also score the starting model (before)."})
    quickstart: bool = field(default=False, metadata={
        "help": "Add the quickstart metrics: held-out GSM8K answer format/accuracy, preference accuracy and "
                "margin (alignkit.train.quickstart.evaluate)."})
    quickstart_questions: int = field(default=16, metadata={"help": "Held-out GSM8K questions (quickstart)."})
    quickstart_pairs: int = field(default=32, metadata={"help": "Held-out preference pairs (quickstart)."})
    quickstart_max_new_tokens: int = field(default=96, metadata={"help": "Generation cap (quickstart)."})
    checks: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Claims checked after eval, exit code 1 if one fails: {metric: 'rise'} (after > before) or "
                "{metric: '>0.6'} / {metric: '<x'} on the final model."})

    _SET_BY_CHAIN: typing.ClassVar[dict[str, str]] = {
        "model": "model.name_or_path, then each stage's output", "output": "output_dir",
        "seed": "the top-level seed"}
    _QUICKSTART: typing.ClassVar[tuple[str, ...]] = (
        "quickstart_questions", "quickstart_pairs", "quickstart_max_new_tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        errors = [f"{k} is set by the chain (from {by}); remove it from the eval section"
                  for k, by in self._SET_BY_CHAIN.items() if getattr(self, k) is not None]
        if not self.tasks and not self.harness:
            errors += [f"{k} is read by the eval tasks and harness; this eval has neither (quickstart only)"
                       for k in ("limit", "max_new_tokens") if is_set(self, k)]
        if not self.quickstart:
            errors += [f"{k} is read only with quickstart: true; this eval has quickstart: false"
                       for k in self._QUICKSTART if is_set(self, k)]
        errors += problems(self) if self.tasks or self.harness else unread(self)
        if errors:
            raise ValueError(errors[0])

    def run_config(self, model: str, output: str | Path, seed: int) -> EvalConfig:
        """The component config of one scoring run: this stage's EvalConfig fields + the chain's values."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig)}
        return EvalConfig(**{**values, "model": model, "output": str(output), "seed": seed})


# ------------------------------------------------------------------------------------------------
# Recipe objects
# ------------------------------------------------------------------------------------------------
@dataclass
class StageRecipe:
    """Everything one training stage needs (the object ``train/<stage>.run`` receives).

    ``user_keys``: the dotted keys (``train.beta``, ``lora.r``) the user set for this stage in the YAML or an
    override, whatever the value (keys the loader sets itself, such as output_dir, seed and the hardware
    defaults, are not among them). ``previous``: the chain's training stage before this one (whose model
    this stage starts from), None for the first.
    """

    stage: str
    model: ModelArgs
    data: DataArgs
    lora: LoraArgs
    train: Any
    seed: int = 0
    resume: bool = True
    extras: dict = field(default_factory=dict)
    user_keys: frozenset[str] = frozenset()
    previous: str | None = None

    def to_dict(self) -> dict:
        """The resolved sections as read: keys this stage ignores (:func:`ignored_settings`) are left out,
        so the model/data/lora/train sections are themselves a valid recipe."""
        train = self.train.to_dict() if hasattr(self.train, "to_dict") else dataclasses.asdict(self.train)
        sections = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                    "lora": dataclasses.asdict(self.lora), "train": _plain(train)}
        for key in ignored_settings(self):
            section, _, name = key.partition(".")
            sections.get(section, {}).pop(name, None)
        return {"stage": self.stage, "seed": self.seed, "resume": self.resume, **sections,
                **_plain(self.extras)}


@dataclass
class Recipe:
    """A parsed recipe: the ordered steps (training stages and/or ``eval``) and their configs."""

    path: str
    steps: list[str]
    stages: dict[str, StageRecipe]
    eval: EvalArgs | None
    output_dir: Path
    seed: int = 0
    resume: bool = True
    raw: dict = field(default_factory=dict)

    @property
    def stage(self) -> str | None:
        """The first training stage's name (what ``alignkit data check RECIPE`` inspects)."""
        return next(iter(self.stages), None)

    def __getattr__(self, name):
        # model/data/lora/train of the first training stage, for tools that read one stage
        if name in SECTIONS and self.__dict__.get("stages"):
            return getattr(next(iter(self.stages.values())), name)
        raise AttributeError(name)

    @property
    def is_chain(self) -> bool:
        return len(self.steps) > 1 or self.steps == ["eval"]

    def stage_dir(self, name: str) -> Path:
        """Single-stage recipes write into output_dir; chain steps into output_dir/<i>_<name>."""
        if not self.is_chain:
            return self.output_dir
        return self.output_dir / f"{self.steps.index(name) + 1}_{name}"

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"recipe": self.path, "steps": self.steps, "output_dir": str(self.output_dir),
                               "seed": self.seed, "resume": self.resume}
        out.update({name: st.to_dict() for name, st in self.stages.items()})
        if self.eval is not None:
            out["eval"] = dataclasses.asdict(self.eval)
        return out


# ------------------------------------------------------------------------------------------------
# Type conversion
# ------------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, where: str):
    """Convert ``value`` (from YAML or an override string) to the annotated type ``tp``.

    Raises :class:`RecipeError` naming ``where`` when the value does not fit. Types this function
    does not model are passed through for the dataclass's own ``__post_init__`` to validate.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, where, tp)
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        items = _as_list(value)
        if items is None:
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_mapping(value, where)
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        raw = value.value if isinstance(value, enum.Enum) else value
        if raw not in valid:
            close = difflib.get_close_matches(str(raw), [str(v) for v in valid], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: {raw!r} is not a valid {tp.__name__}{hint}; valid: {valid}")
        return raw
    if tp is bool:
        return _coerce_bool(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected str, got {value!r}")
    return value


def _coerce_union(value, args, where, tp):
    if value is None:
        if type(None) in args:
            return None
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got null")
    candidates = [a for a in args if a is not type(None)]
    # an Enum member of the union (e.g. OptimizerNames | str) is strict: transformers converts to it anyway
    enums = [a for a in candidates if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums and isinstance(value, str):
        return coerce(value, enums[0], where)
    # 1. an exact match of a plain type wins; 2. then conversions, str last (it accepts anything)
    for a in candidates:
        if isinstance(a, type) and not issubclass(a, enum.Enum) and type(value) is a:
            return value
    errors = []
    for a in sorted(candidates, key=lambda a: a is str):
        try:
            return coerce(value, a, where)
        except RecipeError as e:
            errors.append(str(e))
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_bool(value, where):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise RecipeError(f"{where}: expected bool (true/false), got {value!r}")


def _coerce_int(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
    raise RecipeError(f"{where}: expected int, got {value!r}")


def _as_list(value):
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float, bool)):
        return [value]
    return None


def _parse_mapping(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return yaml12_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: cannot parse {text!r} as a mapping: {e}") from None


# ------------------------------------------------------------------------------------------------
# Dataclass construction with key validation
# ------------------------------------------------------------------------------------------------
def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def unknown_key_error(where: str, key: str, valid: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"{where}: unknown key {key!r}{hint}. Valid keys: {', '.join(sorted(valid))}")


def build_dataclass(cls, values: dict | None, where: str, **forced):
    """``cls(**values)`` with every key checked against the fields and converted to its type."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(where, str(key), list(fields))
        kwargs[key] = coerce(value, hints.get(key, Any), f"{where}.{key}")
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise RecipeError(f"{where}.{key}: {kwargs[key]!r} is not one of {choices}")
    kwargs.update(forced)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e


def hardware_defaults(train_cls, user_keys: set[str]) -> dict:
    """Precision/device defaults chosen from the hardware (not the user's memory): on a machine
    without CUDA ``use_cpu=True, bf16=False``; on CUDA ``bf16`` only where the GPU supports it.
    Keys the user set are left alone."""
    names = set(field_names(train_cls))
    out = {}
    cuda = torch.cuda.is_available()
    if "use_cpu" in names and "use_cpu" not in user_keys and not cuda:
        out["use_cpu"] = True
    if "bf16" in names and "bf16" not in user_keys and not {"fp16"} & user_keys:
        out["bf16"] = bool(cuda and torch.cuda.is_bf16_supported())
    return out


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-6"`` -> (["train", "learning_rate"], "1e-6"); value parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value (e.g. train.learning_rate=1e-6)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml12_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key in a copy of the raw recipe dict (validation happens when building)."""
    out = json.loads(json.dumps(raw, default=str))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _merge(base: dict | None, top: dict | None) -> dict:
    out = dict(base or {})
    for key, value in (top or {}).items():
        out[key] = _merge(out.get(key), value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml12_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(raw).__name__}")
    return raw


# what `accelerate launch --config_file` exports for a sharded config -> the config it came from
SHARDED_LAUNCH = {"ACCELERATE_USE_FSDP": "FSDP (accelerate_configs/fsdp.yaml)",
                  "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (accelerate_configs/deepspeed_zero*.yaml)"}


def check_launch(env, cuda: bool) -> None:
    """A sharded launch on a machine without a CUDA GPU is refused: accelerate would quietly run plain
    data-parallel CPU training (``MULTI_CPU``) and shard nothing, so the launcher setting would be ignored."""
    for var, what in SHARDED_LAUNCH.items():
        if str(env.get(var, "")).lower() == "true" and not cuda:
            raise RecipeError(f"launched with {what} ({var}=true) on a machine without a CUDA GPU: accelerate would "
                              "run plain DDP on CPU (MULTI_CPU) and shard nothing; use "
                              "accelerate_configs/multi_gpu.yaml on CPU")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, strict: bool = True) -> Recipe:
    """Read a recipe YAML, apply dotted overrides and build typed configs for every step.

    ``strict`` (default): refuse any key the user set that the selected path does not read
    (:func:`check_strict`), before anything loads.
    """
    src = str(path)
    check_launch(os.environ, torch.cuda.is_available())
    raw = apply_overrides(read_yaml(path), list(overrides))
    steps = _steps(raw, src)
    valid_top = list(TOP_LEVEL_KEYS) + (list(STAGES) if len(steps) > 1 or steps == ["eval"] else [])
    for key in raw:
        if key not in valid_top:
            raise unknown_key_error(f"{src}: top level", str(key), valid_top)
    seed = coerce(raw.get("seed", 0), int, f"{src}: seed")
    resume = coerce(raw.get("resume", True), bool, f"{src}: resume")  # docs/resume.md
    chain = len(steps) > 1 or steps == ["eval"]
    out_dir = raw.get("output_dir") or (raw.get("train") or {}).get("output_dir") or f"runs/{Path(src).stem}"
    recipe = Recipe(path=src, steps=steps, stages={}, eval=None, output_dir=Path(str(out_dir)),
                    seed=seed, resume=resume, raw=raw)
    if "train" in raw and chain:
        raise RecipeError(f"{src}: a chain takes per-stage train sections (e.g. sft: {{train: ...}}), "
                          f"not a top-level 'train'")
    previous = None
    for name in steps:
        if name == "eval":
            recipe.eval = build_dataclass(EvalArgs, raw.get("eval"), f"{src}: eval")
            continue
        section = raw.get(name, {}) if chain else {k: raw[k] for k in SECTIONS if k in raw}
        if not isinstance(section, dict):
            raise RecipeError(f"{src}: {name}: expected a mapping, got {section!r}")
        where = f"{src}: {name}" if chain else src
        stage = _build_stage(name, raw, section, where, recipe.stage_dir(name), seed, resume)
        stage.previous = previous
        own, shared = user_keys(raw, section, chain)
        stage.user_keys = own | shared
        if strict:
            check_strict(stage, f"{where}:" if chain else f"{src}:", own)
        recipe.stages[name] = stage
        previous = name
    if strict and chain:
        check_shared(recipe, src)
    return recipe


def _steps(raw: dict, src: str) -> list[str]:
    if "stage" in raw and "stages" in raw:
        raise RecipeError(f"{src}: give either 'stage' (one stage) or 'stages' (a chain), not both")
    steps = raw.get("stages", [raw["stage"]] if "stage" in raw else None)
    if steps is None:
        raise RecipeError(f"{src}: missing 'stage' (one of {', '.join(STAGES)}) or 'stages' (a chain)")
    steps = coerce(steps, list[str], f"{src}: stages")
    valid = [*STAGES, "eval"]
    for name in steps:
        if name not in valid:
            raise unknown_key_error(f"{src}: stages", name, valid)
    if len(set(steps)) != len(steps):
        raise RecipeError(f"{src}: stages must not repeat a name: {steps}")
    return steps


def _build_stage(name, raw, section, where, stage_dir, seed, resume) -> StageRecipe:
    module = get_stage_module(name)
    extra_sections: dict = getattr(module, "EXTRA_SECTIONS", {})
    valid = [*SECTIONS, *extra_sections]
    for key in section:
        if key not in valid:
            raise unknown_key_error(where, str(key), valid)
    merged = {k: _merge(raw.get(k), section.get(k)) for k in ("model", "data", "lora")}
    model = build_dataclass(ModelArgs, merged["model"], f"{where}: model")
    data = build_dataclass(DataArgs, merged["data"], f"{where}: data")
    lora = build_dataclass(LoraArgs, merged["lora"], f"{where}: lora")
    train_values = dict(section.get("train") or {})
    train_values.pop("output_dir", None)
    forced = {"output_dir": str(stage_dir)}
    if "seed" not in train_values and "seed" in field_names(module.ARGS_CLASS):
        forced["seed"] = seed
    forced.update(hardware_defaults(module.ARGS_CLASS, set(train_values)))
    train = build_dataclass(module.ARGS_CLASS, train_values, f"{where}: train", **forced)
    extras = {}
    for key, cls in extra_sections.items():
        value = section.get(key, raw.get(key))
        extras[key] = build_dataclass(cls, value, f"{where}: {key}") if cls is not None else value
    return StageRecipe(stage=name, model=model, data=data, lora=lora, train=train, seed=seed,
                       resume=resume, extras=extras)


# ------------------------------------------------------------------------------------------------
# Strictness: nothing the user sets is silently ignored
# ------------------------------------------------------------------------------------------------
#: model keys read only by the stage that loads ``model.name_or_path`` (a chain's later stages start
#: from the previous stage's output folder: alignkit.train.common.load_for_training)
FIRST_STAGE_MODEL_KEYS = ("name_or_path", "revision", "gguf_file")


def user_keys(raw: dict, section: dict, chain: bool) -> tuple[frozenset[str], frozenset[str]]:
    """``(own, shared)`` dotted keys the user set for one stage: its own sections, and in a chain the
    top-level model/data/lora defaults shared by every stage. ``train.output_dir`` is the loader's
    (it becomes the output folder)."""
    own = {f"{sec}.{k}" for sec in SECTIONS for k in (section.get(sec) or {})} - {"train.output_dir"}
    shared = {f"{sec}.{k}" for sec in ("model", "data", "lora") for k in (raw.get(sec) or {})} if chain else set()
    return frozenset(own), frozenset(shared - own)


def ignored_settings(stage: StageRecipe) -> dict[str, str]:
    """``{dotted_key: one-line reason}`` for every key ``stage`` does not read, set or not: the generic rules
    plus the stage module's ``ignored_keys(stage)`` when it defines one.

    Generic rules: with ``lora.enabled: false`` every other lora key holding a value other than its default;
    data keys outside the stage module's ``DATA_KEYS`` (when it declares them); the Trainer's interval knobs
    without their ``*_strategy: steps`` (:func:`_interval_rules`); in a chain, a later stage's
    model.name_or_path/revision/gguf_file (it starts from the previous stage's model).
    """
    module = get_stage_module(stage.stage)
    out: dict[str, str] = {}
    if not stage.lora.enabled:  # a disabled section may restate the defaults, as resolved_config.yaml does
        default = LoraArgs()
        for name in field_names(LoraArgs):
            if name != "enabled" and getattr(stage.lora, name) != getattr(default, name):
                out[f"lora.{name}"] = (f"lora.{name} is read only with lora.enabled: true; this recipe trains "
                                       f"all weights (lora.enabled is false)")
    data_keys = getattr(module, "DATA_KEYS", None)
    if data_keys is not None:
        for name in field_names(DataArgs):
            if name not in data_keys:
                out[f"data.{name}"] = (f"data.{name} is read by stages {_data_readers(name)}; this recipe's "
                                       f"stage is {stage.stage}")
    out.update(_interval_rules(stage.train))
    if stage.previous is not None:
        for name in FIRST_STAGE_MODEL_KEYS:
            out[f"model.{name}"] = (f"model.{name} is read by the chain's first training stage; {stage.stage} "
                                    f"starts from the model {stage.previous} trained")
    hook = getattr(module, "ignored_keys", None)
    if hook is not None:
        out.update(hook(stage))
    return out


#: TrainingArguments interval knobs -> the strategy field that must be "steps" for them to be read
INTERVAL_KEYS = {"eval_steps": "eval_strategy", "save_steps": "save_strategy", "logging_steps": "logging_strategy"}


def _interval_rules(train) -> dict[str, str]:
    """transformers' Trainer reads ``eval_steps``/``save_steps``/``logging_steps`` only under the matching
    ``*_strategy: steps``, and ``save_total_limit`` only when it saves (train sections without the
    strategy fields, e.g. GRPO's, get none of these rules)."""
    out = {}
    for key, strategy in INTERVAL_KEYS.items():
        value = getattr(train, strategy, None)
        if value is not None and str(getattr(value, "value", value)) != "steps":
            out[f"train.{key}"] = (f"train.{key} is read with train.{strategy}: steps; this recipe's {strategy} "
                                   f"is {getattr(value, 'value', value)}")
    save = getattr(train, "save_strategy", None)
    if save is not None and str(getattr(save, "value", save)) == "no":
        out["train.save_total_limit"] = ("train.save_total_limit is read when checkpoints are saved; this "
                                         "recipe's save_strategy is no")
    return out


def _data_readers(name: str) -> str:
    readers = [s for s in STAGES if name in (getattr(get_stage_module(s), "DATA_KEYS", None) or ())]
    return ", ".join(readers) or "none"


def check_strict(stage: StageRecipe, where: str, keys: frozenset[str] | None = None) -> None:
    """Raise :class:`RecipeError` when a key the user set (``keys``, default ``stage.user_keys``) is one the
    stage ignores.

    One line: the first such key's reason (it names the key, the path that ignores it and the paths that
    would read it), plus the other refused keys by name.
    """
    reasons = ignored_settings(stage)
    refused = sorted(k for k in reasons if k in (stage.user_keys if keys is None else keys))
    if refused:
        more = f" (also ignored: {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise RecipeError(f"{where} {reasons[refused[0]]}; remove it{more}")


def check_shared(recipe: Recipe, src: str) -> None:
    """A chain's top-level model/data/lora keys are defaults for every stage: refused when no stage reads one."""
    stages = list(recipe.stages.values())
    shared = {f"{sec}.{k}" for sec in ("model", "data", "lora") for k in (recipe.raw.get(sec) or {})}
    ignored = [ignored_settings(st) for st in stages]
    for key in sorted(shared):
        if stages and all(key in reasons for reasons in ignored):
            raise RecipeError(f"{src}: {key} (top level) is read by no stage of this chain: "
                              f"{ignored[0][key]}; remove it")


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def _plain(obj):
    """Make ``obj`` YAML-safe (enums -> values, paths -> str, dataclasses -> dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save_resolved_config(stage: StageRecipe, path: str | Path, model_source: dict | None = None,
                         recipe_path: str | None = None) -> None:
    """Write the fully resolved stage config (and the model actually loaded) as YAML."""
    doc = resolved_config_doc(stage, model_source, recipe_path)
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def resolved_config_doc(stage: StageRecipe, model_source: dict | None = None, recipe_path: str | None = None) -> dict:
    """The YAML-safe document :func:`save_resolved_config` writes (what a rerun compares against)."""
    doc = {"recipe": recipe_path, **stage.to_dict()}
    if model_source is not None:
        doc["model_source"] = model_source
    return _plain(doc)
