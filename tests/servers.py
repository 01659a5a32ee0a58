"""Test helpers for HTTP generation: a real ``transformers serve`` process and a small fake
OpenAI-compatible server for fault injection (slow answers and hangs, 4xx/5xx, redirects, malformed
or truncated bodies, dropped connections, a server that dies mid-batch, a required API key).

Import from any test file as ``from servers import transformers_serve, FakeOpenAIServer`` (pytest
puts tests/ on sys.path, as for ``from conftest import ...``). Both stop themselves: the real server
is killed by process group in teardown, the fake one shuts down after ``lifetime`` seconds at most.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- transformers serve
@dataclass
class ServerHandle:
    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    model: str  # the name requests must carry (the pinned model path)
    process: subprocess.Popen
    log_path: Path


def _serve_command() -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    exe = str(exe) if exe.exists() else shutil.which("transformers")
    if exe is None:
        raise RuntimeError("the `transformers` CLI is not on PATH (pip install 'transformers[serving]')")
    return [exe, "serve"]


def _log_tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@contextlib.contextmanager
def transformers_serve(model_dir, log_path, *, startup_timeout: float = 240.0, extra_args=()):
    """Run ``transformers serve MODEL_DIR --device cpu`` on a free loopback port until the block ends."""
    port = free_port()
    log_path = Path(log_path)
    cmd = [*_serve_command(), str(model_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path, startup_timeout)
        yield ServerHandle(f"http://127.0.0.1:{port}/v1", str(model_dir), proc, log_path)
    finally:
        _stop_group(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # 1. A server that died will not come up: report its log.
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {proc.returncode}; log:\n{_log_tail(log_path)}")
        # 2. Ask /health; not listening yet is normal during startup.
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"transformers serve not healthy after {timeout:.0f}s; log:\n{_log_tail(log_path)}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------- fake server
@dataclass
class Action:
    """What the fake server does for one request: wait ``delay`` s (cut short when the server stops),
    then answer ``status`` with ``body`` (a dict is sent as JSON, a str as is; None means the default
    echo answer).

    ``truncate``: announce the full Content-Length but send only half the body, then close (the
    client sees ``ChunkedEncodingError``). ``drop``: close the connection without answering.
    ``die``: the server dies here: this request and every later one (also those in flight) get
    their connection closed without an answer, and the port stops accepting."""

    status: int = 200
    body: dict | str | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    truncate: bool = False
    drop: bool = False
    die: bool = False


@dataclass
class Seen:
    path: str
    body: dict
    at: float  # time.monotonic() on arrival
    headers: dict = field(default_factory=dict)


class FakeOpenAIServer:
    """OpenAI-style ``/v1/completions`` and ``/v1/chat/completions`` on 127.0.0.1:<free port>.

    Requests consume ``script`` actions in arrival order; once it is used up every request gets
    ``Action(delay=default_delay)``. The default answer echoes the input and deliberately does NOT
    cut at stop strings: text ``"[<prompt>] STOP tail"`` (chat: ``"[<last message>] STOP tail"``).
    Records every request (``.seen``) and the most requests in flight at once (``.max_in_flight``).
    """

    def __init__(self, script=(), *, default_delay: float = 0.0, lifetime: float = 60.0,
                 api_key: str | None = None, delay_for=None) -> None:
        self.script = list(script)
        self.delay_for = delay_for  # body -> extra seconds (a delay tied to a prompt, not to arrival order)
        self.default_delay = default_delay
        self.api_key = api_key  # when set: 401 unless "Authorization: Bearer <api_key>"
        self.dead = threading.Event()
        self._stopping = threading.Event()
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, client_address: None  # clients that timed out: quiet
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._lifetime = threading.Timer(lifetime, self.stop)  # stops by itself if a test forgets
        self._lifetime.daemon = True

    def __enter__(self):
        self._thread.start()
        self._lifetime.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._lifetime.cancel()
        self._stopping.set()  # hanging handlers return now
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def die(self) -> None:
        """Stop accepting and answer nothing more (as if the process were killed)."""
        self.dead.set()
        threading.Thread(target=self.stop, daemon=True).start()

    def posts_after(self, t: float) -> int:
        """Requests that arrived after ``time.monotonic()`` value ``t``."""
        with self._lock:
            return sum(s.at > t for s in self.seen)

    def _next_action(self, path: str, body: dict, headers: dict) -> Action:
        with self._lock:
            self.seen.append(Seen(path, body, time.monotonic(), headers))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
                return Action(status=401, body={"error": {"message": "invalid or missing API key"}})
            return self.script.pop(0) if self.script else Action(delay=self.default_delay)

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                action = server._next_action(self.path, body, dict(self.headers))
                try:
                    if action.die:
                        server.die()
                    extra = server.delay_for(body) if server.delay_for else 0.0
                    server._stopping.wait(action.delay + extra)
                    if action.drop or server.dead.is_set():
                        self.close_connection = True
                        return
                    payload = action.body if action.body is not None else _echo(self.path, body)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(action.status)
                    for k, v in {"Content-Type": "application/json", **action.headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2] if action.truncate else data)
                    self.close_connection = self.close_connection or action.truncate
                finally:
                    server._done()

        return Handler


def _echo(path: str, body: dict) -> dict:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    if path.endswith("/chat/completions"):
        text = f"[{body['messages'][-1]['content']}] STOP tail"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
    else:
        choice = {"index": 0, "text": f"[{body.get('prompt')}] STOP tail", "finish_reason": "length"}
    return {"id": "fake", "object": "text_completion", "model": body.get("model"), "choices": [choice],
            "usage": usage}
