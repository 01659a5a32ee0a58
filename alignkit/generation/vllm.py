"""Generation with vLLM in-process (``pip install 'alignkit[vllm]'``, needs a CUDA GPU).

vLLM is imported lazily: this module imports without it, and its pure helpers
(:func:`to_vllm_sampling_kwargs`, :func:`from_vllm_outputs`, :func:`vllm_named_weights`) are
tested on machines without vLLM.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence

from alignkit.generation.base import Completion, SamplingParams, truncate_at_stop
from alignkit.generation.hf import tokens_within
from alignkit.generation.stats import GenerationStats

logger = logging.getLogger(__name__)

INSTALL_HINT = "vLLM is not installed: pip install 'alignkit[vllm]' (needs a CUDA GPU)"


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


def to_vllm_sampling_kwargs(params: SamplingParams) -> dict:
    """Keyword arguments for ``vllm.SamplingParams`` with the meaning :class:`SamplingParams` has here."""
    return {
        "temperature": params.temperature,  # vLLM: 0 means greedy
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "min_tokens": params.min_new_tokens,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "include_stop_str_in_output": False,  # the contract: text never contains the stop string
    }


def per_request_sampling_kwargs(params: SamplingParams, n: int) -> list[dict]:
    """One kwargs dict per request. A seed becomes ``seed + i`` for request i: vLLM seeds each
    request on its own, so one shared seed would give a GRPO group of repeated prompts n copies of
    the same sample."""
    base = to_vllm_sampling_kwargs(params)
    if params.seed is None:
        return [base] * n
    return [{**base, "seed": params.seed + i} for i in range(n)]


def from_vllm_outputs(outputs, *, eos_token_ids: Sequence[int] = (), stop: Sequence[str] = (),
                      tokenizer=None) -> list[Completion]:
    """``RequestOutput`` list (``.outputs[0].text/.token_ids/.finish_reason/.stop_reason``,
    ``.prompt_token_ids``) -> one :class:`Completion` each.

    vLLM keeps the EOS token and the tokens of a stop string in ``token_ids``; they are removed
    here (EOS always; stop-string tokens when ``tokenizer`` is given: tokens wholly before the cut).
    """
    completions = []
    for i, request in enumerate(outputs):
        # 1. Take the first (only) sample of the request.
        if not getattr(request, "outputs", None):
            raise ValueError(f"vLLM output {i} has no samples (.outputs is empty)")
        out = request.outputs[0]
        if out.finish_reason is None:
            raise ValueError(f"vLLM output {i} is unfinished (finish_reason None)")
        ids = [int(t) for t in out.token_ids]
        # 2. Drop a trailing EOS (stop_reason is None for EOS, the string/id for stop strings/ids).
        if out.finish_reason == "stop" and ids and ids[-1] in eos_token_ids:
            ids = ids[:-1]
        # 3. Cut text at stop strings again (include_stop_str_in_output=False normally does it).
        text, hit_stop = truncate_at_stop(out.text, stop)
        if tokenizer is not None and (hit_stop or isinstance(out.stop_reason, str)):
            ids = tokens_within(ids, text, lambda t: tokenizer.decode(t, skip_special_tokens=True))
        completions.append(Completion(
            text=text, token_ids=ids, finish_reason="length" if out.finish_reason == "length" else "stop",
            prompt_tokens=len(getattr(request, "prompt_token_ids", None) or [])))
    return completions


def _vllm_name(name: str) -> str:
    """A transformers/PEFT parameter name -> the name vLLM's ``load_weights`` expects."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod.", "modules_to_save.default."):
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def vllm_named_weights(model) -> Iterator[list[tuple[str, object]]]:
    """``(name, tensor)`` pairs of ``model`` as vLLM names them. A PEFT model's adapters are merged
    (peft's ``merge_adapter``) for the block and unmerged after; LoRA tensors themselves are left out."""
    is_peft = callable(getattr(model, "merge_adapter", None)) and hasattr(model, "peft_config")
    if is_peft:
        model.merge_adapter()
    try:
        pairs = []
        for name, param in model.named_parameters():
            if is_peft and (".lora_" in name or "original_module" in name):
                continue
            pairs.append((_vllm_name(name), param.data))
        yield pairs
    finally:
        if is_peft:
            model.unmerge_adapter()


class VLLMGenerator:
    """A :class:`~alignkit.generation.base.Generator` on ``vllm.LLM``.

    With ``tensor_parallel_size == 1`` the engine runs in this process (``external_launcher``, as
    TRL's colocate mode does), which is what lets :meth:`update_weights` reach the model.
    """

    def __init__(self, model_path, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", seed: int = 0, name: str | None = None, **engine_kwargs) -> None:
        vllm = _import_vllm()
        if tensor_parallel_size == 1 and "distributed_executor_backend" not in engine_kwargs:
            from trl.trainer.utils import ensure_master_addr_port

            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            ensure_master_addr_port()
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(model=str(model_path), tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                            **engine_kwargs)
        self._sampling_params_cls = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids = [eos] if eos is not None else []
        self.name = name or f"vllm:{model_path}"
        self.stats = GenerationStats()

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        prompts = _as_list(prompts)
        return self._run(lambda sp: self.llm.generate(prompts, sp, use_tqdm=False), len(prompts), params)

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams) -> list[Completion]:
        convs = _as_list(conversations)
        return self._run(lambda sp: self.llm.chat(convs, sp, use_tqdm=False, add_generation_prompt=True),
                         len(convs), params)

    def update_weights(self, model) -> None:
        """Load ``model``'s weights (PEFT adapters merged) into the engine."""
        load = _weight_loader(self.llm)
        with vllm_named_weights(model) as pairs:
            load(pairs)
        self.llm.reset_prefix_cache()

    def _run(self, call, n: int, params: SamplingParams) -> list[Completion]:
        if n == 0:
            return []
        started = time.perf_counter()
        sampling = [self._sampling_params_cls(**kw) for kw in per_request_sampling_kwargs(params, n)]
        outputs = call(sampling)
        results = from_vllm_outputs(outputs, eos_token_ids=self.eos_token_ids, stop=params.stop,
                                    tokenizer=self.tokenizer)
        self.stats.add(requests=n, prompt_tokens=sum(c.prompt_tokens for c in results),
                       generated_tokens=sum(c.num_tokens for c in results), seconds=time.perf_counter() - started)
        return results


def _weight_loader(llm):
    """A function that loads ``[(name, tensor)]`` into the engine's model, for the vLLM at hand."""
    try:  # in-process engine (external_launcher / no multiprocessing): what TRL's colocate mode uses
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        return model.load_weights
    except AttributeError:
        pass
    if callable(getattr(llm, "apply_model", None)):  # newer vLLM: run a function on each worker's model
        return lambda pairs: llm.apply_model(lambda m: m.load_weights(pairs))
    raise RuntimeError(
        "VLLMGenerator.update_weights: this vLLM exposes neither "
        "llm.llm_engine.model_executor.driver_worker.model_runner.model nor LLM.apply_model; "
        "run with tensor_parallel_size=1 (in-process engine) or use TRL's vLLM server mode")


def _as_list(items) -> list:
    if isinstance(items, str):
        raise TypeError("expected a sequence of prompts/conversations, got a single str")
    return list(items)
