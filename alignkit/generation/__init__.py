"""One generation interface, three backends: transformers ``generate`` (hf), vLLM in-process (vllm),
and any OpenAI-compatible server over HTTP (openai_http). Eval tasks, the judge and the GRPO loop
all take a :class:`Generator`; none of them builds one (``make_generator`` does, from a string)."""
from alignkit.generation.base import Completion, Generator, SamplingParams, truncate_at_stop
from alignkit.generation.factory import make_generator
from alignkit.generation.stats import GenerationStats

__all__ = ["Completion", "GenerationStats", "Generator", "SamplingParams", "make_generator", "truncate_at_stop"]
