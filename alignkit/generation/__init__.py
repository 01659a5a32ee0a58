"""One generation interface, three backends: transformers ``generate`` (hf), vLLM in-process (vllm),
and any OpenAI-compatible server over HTTP (openai_http). Eval tasks, the judge and the GRPO loop
all take a :class:`Generator`; none of them builds one."""
from alignkit.generation.base import Completion, Generator, SamplingParams

__all__ = ["Completion", "Generator", "SamplingParams"]
