"""Generation through any OpenAI-compatible server (vLLM serve, ``transformers serve``, SGLang, TGI, ...).

``generate`` posts to ``{base_url}/completions``, ``chat`` to ``{base_url}/chat/completions``; requests
run on at most ``max_concurrency`` daemon worker threads (results keep the input order).

Faults (each has a test in tests/test_generation_openai_http.py against tests/servers.py):

* transient failures (connection refused/reset, a body shorter than its Content-Length
  (``ChunkedEncodingError``) or undecodable, 429, 5xx, a connect timeout) are retried up to
  ``max_retries`` times with exponential backoff and jitter (a ``Retry-After`` header is honoured);
* a read timeout is NOT re-sent by default (the server may still be working on it, and a re-send
  doubles its load): ``retry_timeouts=True`` allows it;
* 4xx, a 3xx (redirects are never followed: the prompts are not re-posted to another host) and a
  malformed answer fail that request at once;
* ``on_result(index, result)`` (optional keyword of ``generate``/``chat``) receives each request's
  :class:`Completion`, or the :class:`GenerationHTTPError` that ended it, in the calling thread as
  soon as it exists; without it the first failure raises;
* an exception in the calling thread (Ctrl-C) sets a stop event that every worker checks before each
  attempt and each backoff sleep: nothing is sent after it and nobody waits for requests in flight.

Credentials in the URL (``http://user:secret@host/v1``) are sent as HTTP basic auth (they win over
``api_key``) and shown as ``http://***@host/v1`` in ``name``, ``base_url``, logs and errors.

Over HTTP the generated token ids are not available: ``Completion.token_ids`` stays empty and the
server's ``usage.completion_tokens`` is counted in ``generator.stats``.
"""
from __future__ import annotations

import email.utils
import logging
import queue
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence

import requests

from alignkit.generation.base import Completion, OnResult, SamplingParams, truncate_at_stop
from alignkit.generation.stats import GenerationStats

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 120.0  # a Retry-After longer than this is capped
TRANSIENT = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
             requests.exceptions.ContentDecodingError)  # ConnectTimeout is a ConnectionError too


class GenerationHTTPError(RuntimeError):
    """A request failed for good: a 4xx, a 3xx, a malformed answer, a read timeout, or retries used up.

    ``url`` (credentials redacted) and ``index`` (the request's position in its batch) are in the
    one-line message and kept as attributes."""

    def __init__(self, message: str, *, url: str = "", index: int | None = None) -> None:
        super().__init__(message)
        self.url, self.index = url, index


class _Stopped(Exception):
    """The stop event was set: a worker gives up without sending."""


def redact_url(url: str) -> str:
    """``http://user:secret@host:1/v1`` -> ``http://***@host:1/v1``; URLs without credentials unchanged."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(URL without userinfo, (user, password) or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))


class OpenAIHTTPGenerator:
    """A :class:`~alignkit.generation.base.Generator` for an OpenAI-compatible HTTP endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``http://user:pass@host/v1``: basic auth).
        model: the model name the server expects in the ``model`` field.
        api_key: sent as ``Authorization: Bearer ...`` when given (never logged or shown).
        max_concurrency: at most this many requests in flight.
        timeout: seconds per request (connect and read).
        max_retries: retries after the first attempt of a transient failure.
        backoff: first retry waits about ``backoff`` s, then ``2*backoff``, ``4*backoff``, ... (each
            times a random factor in [0.5, 1.5): jitter, so that workers do not retry in lockstep).
        retry_timeouts: also re-send a request whose answer timed out (off: the server may still be
            running it).
        use_chat: send ``generate`` prompts to the chat endpoint as one user message each
            (for servers that only serve chat; the server's chat template is then applied).
        extra_body: extra fields merged into every request (e.g. ``{"top_k": -1}`` for vLLM).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 8,
                 timeout: float = 60, max_retries: int = 3, backoff: float = 0.5, retry_timeouts: bool = False,
                 use_chat: bool = False, extra_body: dict | None = None, name: str | None = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"OpenAIHTTPGenerator max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"OpenAIHTTPGenerator max_retries must be >= 0, got {max_retries}")
        self._endpoint, self._auth = _split_credentials(base_url.rstrip("/"))
        self.base_url = redact_url(base_url.rstrip("/"))  # what is shown; requests go to _endpoint
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.retry_timeouts = retry_timeouts
        self.use_chat = use_chat
        self.extra_body = dict(extra_body or {})
        self.name = name or f"http:{self.base_url}#{model}"
        self.stats = GenerationStats()
        self._headers = {"Content-Type": "application/json"}
        if api_key and self._auth is None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()  # one requests.Session per worker thread

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str], params: SamplingParams, *,
                 on_result: OnResult | None = None) -> list[Completion]:
        prompts = _as_list(prompts)
        if self.use_chat:
            return self.chat([[{"role": "user", "content": p}] for p in prompts], params, on_result=on_result)
        bodies = [{"model": self.model, "prompt": p, **self._sampling_fields(params, i)}
                  for i, p in enumerate(prompts)]
        return self._run("/completions", bodies, params, _completion_text, on_result)

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams, *,
             on_result: OnResult | None = None) -> list[Completion]:
        bodies = [{"model": self.model, "messages": conv, **self._sampling_fields(params, i)}
                  for i, conv in enumerate(_as_list(conversations))]
        return self._run("/chat/completions", bodies, params, _chat_text, on_result)

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

    def _run(self, path: str, bodies: list[dict], params: SamplingParams, text_of: Callable,
             on_result: OnResult | None) -> list:
        """Send every body; deliver each result as it arrives (``on_result``) or raise the first failure.
        Returns the completions in input order (None where a request failed, with ``on_result``)."""
        shown, started = self.base_url + path, time.perf_counter()
        results: list = [None] * len(bodies)
        todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        for i in range(len(bodies)):
            todo.put(i)
        for _ in range(min(self.max_concurrency, len(bodies))):
            threading.Thread(target=self._worker, args=(path, bodies, todo, done, stop), daemon=True,
                             name="alignkit-http").start()
        try:
            for _ in bodies:
                # 1. the next finished request (waits in short slices: Ctrl-C is seen at once)
                index, payload = _next(done)
                # 2. its Completion, or the error that ended it; 3. hand it over (or raise)
                result = payload if isinstance(payload, GenerationHTTPError) else self._completion(
                    payload, shown, index, params, text_of)
                if on_result is None and isinstance(result, GenerationHTTPError):
                    raise result
                results[index] = None if isinstance(result, GenerationHTTPError) else result
                if on_result is not None:
                    on_result(index, result)
        finally:
            stop.set()  # workers send nothing more; nobody waits for the requests in flight
            self.stats.seconds += time.perf_counter() - started
        return results

    def _completion(self, payload: dict, shown: str, index: int, params, text_of):
        try:
            completion = _to_completion(payload, shown, index, params, text_of)
        except GenerationHTTPError as err:
            return err
        usage = payload.get("usage") or {}
        self.stats.add(requests=1, prompt_tokens=usage.get("prompt_tokens") or 0,
                       generated_tokens=usage.get("completion_tokens") or 0, seconds=0.0)
        return completion

    def _worker(self, path: str, bodies: list[dict], todo: queue.SimpleQueue, done: queue.SimpleQueue,
                stop: threading.Event) -> None:
        """Take request indices until none is left or ``stop`` is set; put (index, payload | error)."""
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out = self._request(path, bodies[index], index, stop)
            except _Stopped:
                return
            except GenerationHTTPError as err:
                out = err
            except Exception as err:  # noqa: BLE001 (an unexpected library error fails this request, not the pool)
                out = GenerationHTTPError(f"{self.base_url}{path} (request {index}): {type(err).__name__}: "
                                          f"{self._hide(str(err))}", url=self.base_url + path, index=index)
            done.put((index, out))

    def _request(self, path: str, body: dict, index: int, stop: threading.Event) -> dict:
        """POST with retries; returns the decoded JSON payload. Raises _Stopped once ``stop`` is set."""
        shown, problem, attempt = self.base_url + path, "", 0
        where = f"{shown} (request {index})"
        for attempt in range(self.max_retries + 1):
            # 1. Send (never after a stop); transient failures set `problem`, others raise or return.
            if stop.is_set():
                raise _Stopped
            retry_after = None
            try:
                resp = self._session().post(self._endpoint + path, json=body, headers=self._headers,
                                            auth=self._auth, timeout=self.timeout, allow_redirects=False)
            except requests.ReadTimeout as err:
                problem = f"{type(err).__name__}: {self._hide(str(err))}"
                if not self.retry_timeouts:
                    problem += ("; not re-sent while the server may still be working on it "
                                "(retry_timeouts=True / --http-retry-timeouts allows it)")
                    break
            except TRANSIENT as err:
                problem = f"{type(err).__name__}: {self._hide(str(err))}"
            else:
                problem, retry_after = self._check_status(resp, where, shown, index)
                if not problem:
                    return _decode_json(resp, where, shown, index)
            # 2. Give up, or wait (Retry-After if the server sent one, else backoff with jitter).
            if attempt == self.max_retries:
                break
            wait = retry_after if retry_after is not None else self.backoff * 2 ** attempt * (0.5 + random.random())
            logger.warning("%s: %s; retry %d/%d in %.2fs", where, problem, attempt + 1, self.max_retries, wait)
            if stop.wait(wait):
                raise _Stopped
        raise GenerationHTTPError(f"{where}: failed after {attempt + 1} attempts; last error: {problem}",
                                  url=shown, index=index)

    def _check_status(self, resp: requests.Response, where: str, url: str, index: int) -> tuple[str, float | None]:
        """("", None) for a 2xx; (problem, Retry-After) for a retryable status; raises for the others."""
        status = resp.status_code
        if status == 429 or status >= 500:
            return f"HTTP {status}: {self._hide(resp.text[:300])!r}", _parse_retry_after(resp.headers.get("Retry-After"))
        if 300 <= status < 400:
            target = redact_url(resp.headers.get("Location") or "(no Location header)")
            raise GenerationHTTPError(f"{where}: HTTP {status} redirect to {target} not followed (redirects "
                                      "are never followed; point the base URL at the server itself)",
                                      url=url, index=index)
        if status >= 400:
            raise GenerationHTTPError(f"{where}: HTTP {status}, not retried; server said: "
                                      f"{self._hide(resp.text[:500])!r}", url=url, index=index)
        return "", None

    def _hide(self, text: str) -> str:
        """``text`` with the URL's credentials and the API key replaced by ``***``."""
        secrets = [s for s in (*(self._auth or ()), self._headers.get("Authorization", "")[7:]) if s]
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    def _session(self) -> requests.Session:
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session


def _next(done: queue.SimpleQueue) -> tuple[int, object]:
    """The next (index, payload) from the workers, waiting in 0.1 s slices (KeyboardInterrupt-friendly)."""
    while True:
        try:
            return done.get(timeout=0.1)
        except queue.Empty:
            continue


def _decode_json(resp: requests.Response, where: str, url: str, index: int) -> dict:
    try:
        payload = resp.json()
    except ValueError as err:
        raise GenerationHTTPError(f"{where}: malformed JSON in HTTP {resp.status_code} answer ({err}); "
                                  f"received: {resp.text[:500]!r}", url=url, index=index) from err
    if not isinstance(payload, dict):
        raise GenerationHTTPError(f"{where}: expected a JSON object, received: {resp.text[:500]!r}",
                                  url=url, index=index)
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
                                  f"{str(payload)[:500]}", url=url, index=index)
    choice = choices[0]
    text = text_of(choice)
    if text is None and "message" in choice:  # a chat answer with content null (e.g. only tool calls)
        text = ""
    if not isinstance(text, str):
        field = "message.content" if "message" in choice else "text"
        raise GenerationHTTPError(f"{url} (request {index}): choices[0].{field} missing or not a string; "
                                  f"received: {str(choice)[:500]}", url=url, index=index)
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
