"""A small OpenAI-compatible test server on 127.0.0.1 that batches concurrent requests.

``POST /v1/completions`` requests that arrive within ``window_s`` of each other (up to
``max_batch``) are generated together by one :class:`~alignkit.generation.hf.HFGenerator` call,
as a batching inference server (vLLM, TGI, ``transformers serve --continuous-batching``) would.
For the HTTP benchmark only: it shows whether a client's concurrent requests reach the server
together. Greedy decoding; ``max_tokens``, ``stop`` and ``temperature`` are honoured.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alignkit.generation.base import SamplingParams


class BatchingServer:
    """``with BatchingServer(generator) as url: ...``; ``batch_sizes`` records each batch's size."""

    def __init__(self, generator, *, max_batch: int = 8, window_s: float = 0.02, model_name: str = "bench"):
        self.generator, self.max_batch, self.window_s, self.model_name = generator, max_batch, window_s, model_name
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._threads = [threading.Thread(target=self._httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._batch_loop, daemon=True)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> str:
        for t in self._threads:
            t.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=10)

    # ------------------------------------------------------------------ batching
    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            # 1. wait for a first request, then collect more for up to window_s
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            # 2. one generate call per group of equal sampling settings, answers to each waiting handler
            self.batch_sizes.append(len(batch))
            groups: dict[str, list] = {}
            for item in batch:
                groups.setdefault(repr(item[1]), []).append(item)
            for items in groups.values():
                try:
                    outs = self.generator.generate([it[0] for it in items], items[0][1])
                    for it, out in zip(items, outs):
                        it[2].update(completion=out)
                except Exception as err:  # noqa: BLE001 - reported to the client as HTTP 500
                    for it in items:
                        it[2].update(error=repr(err))
                for it in items:
                    it[3].set()

    def submit(self, prompt: str, params: SamplingParams) -> dict:
        result: dict = {}
        done = threading.Event()
        self._queue.put((prompt, params, result, done))
        if not done.wait(timeout=600):
            return {"error": "batching server: no answer within 600 s"}
        return result

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/completions") or "prompt" not in body:
                    return self._send(404, {"error": f"only POST /v1/completions with a prompt, got {self.path}"})
                params = SamplingParams(max_new_tokens=int(body.get("max_tokens", 16)),
                                        stop=list(body.get("stop") or []))
                result = server.submit(body["prompt"], params)
                if "error" in result:
                    return self._send(500, {"error": result["error"]})
                c = result["completion"]
                self._send(200, {"object": "text_completion", "model": server.model_name,
                                 "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason}],
                                 "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.num_tokens}})

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
