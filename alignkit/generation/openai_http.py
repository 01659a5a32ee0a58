"""Generation through any OpenAI-compatible server (vLLM serve, ``transformers serve``, SGLang, TGI, ...).

``generate`` posts to ``{base_url}/completions``, ``chat`` to ``{base_url}/chat/completions``; requests
run in a bounded thread pool (results keep the input order) and are retried with exponential
backoff on 429, 5xx, timeouts and connection errors (a ``Retry-After`` header is honoured).

Over HTTP the generated token ids are not available: ``Completion.token_ids`` stays empty and the
server's ``usage.completion_tokens`` is counted in ``generator.stats``.
"""
from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from alignkit.generation.base import Completion, SamplingParams, truncate_at_stop
from alignkit.generation.stats import GenerationStats

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 120.0  # a Retry-After longer than this is capped


class GenerationHTTPError(RuntimeError):
    """A request failed for good: a 4xx, a malformed answer, or retries used up."""


class OpenAIHTTPGenerator:
    """A :class:`~alignkit.generation.base.Generator` for an OpenAI-compatible HTTP endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects in the ``model`` field.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        max_concurrency: at most this many requests in flight.
        timeout: seconds per request (connect and read).
        max_retries: retries after the first attempt (429 / 5xx / timeout / connection error).
        backoff: first retry waits ``backoff`` s, then ``2*backoff``, ``4*backoff``, ...
        use_chat: send ``generate`` prompts to the chat endpoint as one user message each
            (for servers that only serve chat; the server's chat template is then applied).
        extra_body: extra fields merged into every request (e.g. ``{"top_k": -1}`` for vLLM).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 8,
                 timeout: float = 60, max_retries: int = 3, backoff: float = 0.5, use_chat: bool = False,
                 extra_body: dict | None = None, name: str | None = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"OpenAIHTTPGenerator max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"OpenAIHTTPGenerator max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.use_chat = use_chat
        self.extra_body = dict(extra_body or {})
        self.name = name or f"http:{self.base_url}#{model}"
        self.stats = GenerationStats()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()  # one requests.Session per worker thread

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        prompts = _as_list(prompts)
        if self.use_chat:
            return self.chat([[{"role": "user", "content": p}] for p in prompts], params)
        bodies = [{"model": self.model, "prompt": p, **self._sampling_fields(params, i)}
                  for i, p in enumerate(prompts)]
        return self._run("/completions", bodies, params, _completion_text)

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams) -> list[Completion]:
        bodies = [{"model": self.model, "messages": conv, **self._sampling_fields(params, i)}
                  for i, conv in enumerate(_as_list(conversations))]
        return self._run("/chat/completions", bodies, params, _chat_text)

    def update_weights(self, model) -> None:
        raise NotImplementedError(
            f"{self.name}: weights of a remote server cannot be updated over the OpenAI API; "
            "save the model and restart the server, or use the hf/vllm backend for RL rollouts")

    # ------------------------------------------------------------------ internals
    def _sampling_fields(self, params: SamplingParams, index: int) -> dict:
        fields = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            fields["stop"] = list(params.stop)
        if params.seed is not None:
            # One seed per request, so repeated prompts (GRPO groups) still get different samples.
            fields["seed"] = params.seed + index
        if params.min_new_tokens:
            fields["min_tokens"] = params.min_new_tokens  # vLLM extension; OpenAI has no such field
        return {**fields, **self.extra_body}

    def _run(self, path: str, bodies: list[dict], params: SamplingParams, text_of: Callable) -> list[Completion]:
        url = self.base_url + path
        started = time.perf_counter()
        payloads: list[dict] = []
        if bodies:
            pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)),
                                      thread_name_prefix="alignkit-http")
            try:
                futures = [pool.submit(self._request, url, body, i) for i, body in enumerate(bodies)]
                payloads = [f.result() for f in futures]  # input order; the first failure raises
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        results = [_to_completion(p, url, i, params, text_of) for i, p in enumerate(payloads)]
        usage = [p.get("usage") or {} for p in payloads]
        self.stats.add(requests=len(results), prompt_tokens=sum(u.get("prompt_tokens") or 0 for u in usage),
                       generated_tokens=sum(u.get("completion_tokens") or 0 for u in usage),
                       seconds=time.perf_counter() - started)
        return results

    def _request(self, url: str, body: dict, index: int) -> dict:
        """POST with retries; returns the decoded JSON payload."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            # 1. Send; transient failures set `problem` and `wait`, others raise or return.
            retry_after = None
            try:
                resp = self._session().post(url, json=body, headers=self._headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}: {resp.text[:300]!r}"
                    retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
                elif resp.status_code >= 400:
                    raise GenerationHTTPError(f"{url} (request {index}): HTTP {resp.status_code}, not retried; "
                                              f"server said: {resp.text[:500]!r}")
                else:
                    return _decode_json(resp, url, index)
            # 2. Give up, or wait (Retry-After if the server sent one, else exponential backoff).
            if attempt == self.max_retries:
                break
            wait = retry_after if retry_after is not None else self.backoff * 2 ** attempt
            logger.warning("%s (request %d): %s; retry %d/%d in %.2fs", url, index, problem, attempt + 1,
                           self.max_retries, wait)
            time.sleep(wait)
        raise GenerationHTTPError(f"{url} (request {index}): failed after {self.max_retries + 1} attempts; "
                                  f"last error: {problem}")

    def _session(self) -> requests.Session:
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session


def _decode_json(resp: requests.Response, url: str, index: int) -> dict:
    try:
        payload = resp.json()
    except ValueError as err:
        raise GenerationHTTPError(f"{url} (request {index}): malformed JSON in HTTP {resp.status_code} "
                                  f"answer ({err}); received: {resp.text[:500]!r}") from err
    if not isinstance(payload, dict):
        raise GenerationHTTPError(f"{url} (request {index}): expected a JSON object, received: "
                                  f"{resp.text[:500]!r}")
    return payload


def _completion_text(choice: dict):
    return choice.get("text")


def _chat_text(choice: dict):
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else None


def _to_completion(payload: dict, url: str, index: int, params: SamplingParams, text_of: Callable) -> Completion:
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GenerationHTTPError(f"{url} (request {index}): answer has no choices[0]; received: "
                                  f"{str(payload)[:500]}")
    choice = choices[0]
    text = text_of(choice)
    if text is None and "message" in choice:  # a chat answer with content null (e.g. only tool calls)
        text = ""
    if not isinstance(text, str):
        field = "message.content" if "message" in choice else "text"
        raise GenerationHTTPError(f"{url} (request {index}): choices[0].{field} missing or not a string; "
                                  f"received: {str(choice)[:500]}")
    # Servers cut at stop strings already; cut again in case one did not (or included it).
    text, hit_stop = truncate_at_stop(text, params.stop)
    usage = payload.get("usage") or {}
    reason = choice.get("finish_reason")
    if reason is None:
        reason = "length" if (usage.get("completion_tokens") or 0) >= params.max_new_tokens else "stop"
    finish = "length" if reason == "length" and not hit_stop else "stop"
    return Completion(text=text, token_ids=[], finish_reason=finish, prompt_tokens=usage.get("prompt_tokens") or 0,
                      usage_tokens=usage.get("completion_tokens"))


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is delay-seconds or an HTTP date (RFC 9110 10.2.3); capped at MAX_RETRY_AFTER_S."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _as_list(items) -> list:
    if isinstance(items, str):
        raise TypeError("expected a sequence of prompts/conversations, got a single str")
    return list(items)
