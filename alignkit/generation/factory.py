"""Build a Generator from a string: ``hf:PATH``, ``vllm:PATH``, ``http(s)://HOST:PORT/v1`` (+ model name)."""
from __future__ import annotations

from alignkit.generation.hf import HFGenerator
from alignkit.generation.openai_http import OpenAIHTTPGenerator
from alignkit.generation.vllm import VLLMGenerator
from alignkit.models import load_model

SPEC_FORMS = "'hf:PATH_OR_NAME', 'vllm:PATH_OR_NAME', 'http://HOST:PORT/v1' (with model=NAME, or URL#NAME)"


def load_hf(path: str, **load_kwargs):
    """(model, tokenizer) for generation through alignkit's one model loader."""
    model, tokenizer, _source = load_model(path, for_generation=True, **load_kwargs)
    return model, tokenizer


DEFAULT_BATCH_SIZE = 8  # hf: prompts per generate call


def _refuse(spec: str, **given) -> None:
    """Settings only the hf backend reads, given to another one: an error, never silently dropped."""
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"make_generator({spec!r}): {name}= is read by the hf backend only "
                             "(vllm loads and batches itself; http takes model='NAME' and max_concurrency)")


def make_generator(spec: str, *, model=None, tokenizer=None, batch_size: int | None = None, **kw):
    """A :class:`~alignkit.generation.base.Generator` for ``spec``.

    * ``hf:PATH`` -> :class:`~alignkit.generation.hf.HFGenerator`; loads PATH with
      ``alignkit.models.load_model(PATH, for_generation=True, **kw)`` unless a loaded ``model`` and
      ``tokenizer`` are passed (then PATH only names it); ``batch_size`` prompts per call (default 8).
    * ``vllm:PATH`` -> :class:`~alignkit.generation.vllm.VLLMGenerator` (``**kw``: engine options).
    * ``http://HOST:PORT/v1`` -> :class:`~alignkit.generation.openai_http.OpenAIHTTPGenerator`;
      the served model's name comes from ``model=`` or a ``#NAME`` suffix (``**kw``: its options).

    ``tokenizer=`` and ``batch_size=`` are read by the hf backend only; given to another they are refused.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"make_generator: expected a spec string ({SPEC_FORMS}), got {spec!r}")
    if spec.startswith("hf:"):
        path = spec[3:]
        if model is None:
            model, tokenizer = load_hf(path, **kw)
        elif tokenizer is None:
            raise ValueError("make_generator('hf:...', model=...): pass the tokenizer too")
        elif kw:
            raise ValueError(f"make_generator({spec!r}, model=...): {', '.join(kw)} would load a model, but a "
                             "loaded model was passed")
        return HFGenerator(model, tokenizer, batch_size=batch_size or DEFAULT_BATCH_SIZE, name=spec)
    if spec.startswith("vllm:"):
        _refuse(spec, tokenizer=tokenizer, batch_size=batch_size, model=model)
        return VLLMGenerator(spec[5:], **kw)
    if spec.startswith(("http://", "https://")):
        _refuse(spec, tokenizer=tokenizer, batch_size=batch_size)
        url, _, fragment = spec.partition("#")
        if model is not None and fragment and fragment != model:
            raise ValueError(f"make_generator({spec!r}, model={model!r}): two different model names")
        name = model if model is not None else (fragment or None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"make_generator({spec!r}): an HTTP backend needs the served model's name "
                             "(model='NAME' or 'URL#NAME')")
        return OpenAIHTTPGenerator(url, name, **kw)
    raise ValueError(f"make_generator: unknown generator spec {spec!r}; expected {SPEC_FORMS}")
