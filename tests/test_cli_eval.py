"""`alignkit eval` (alignkit.cli.eval): flags generated from EvalConfig, exit codes, the tiny model end to
end, lm-eval's token cap, refused flags, and the HTTP backend with its options against a stub server."""
from __future__ import annotations

import _thread
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from servers import Action, FakeOpenAIServer

from alignkit.cli import eval as cli
from alignkit.eval import runner
from alignkit.eval.config import EvalConfig
from alignkit.eval.runner import run_eval

# today's spellings (and the README's): the generated parser must keep every one
FLAGS = ["--model", "--tasks", "--prompt", "--limit", "--seed", "--output", "--backend", "--base-url", "--judge",
         "--batch-size", "--max-new-tokens", "--resume", "--harness", "--device", "--task-dir"]


def test_cli_errors_exit_2(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path / "nope"), "--tasks", "mmlu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--tasks", "mmlu,hellaswag"]) == 2
    assert "unknown eval task 'hellaswag'; valid tasks: mmlu, gsm8k" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--tasks", "mmlu", "--prompt", "fewshot"]) == 2
    assert cli.main(["--task-dir"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.endswith("lm_eval_tasks") and any(p.suffix == ".yaml" for p in __import__("pathlib").Path(
        printed).iterdir())


def test_cli_runs_tiny_model_and_prints_summary(tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--model", str(tiny_model_dir), "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "3",
                   "--output", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"gsm8k\s+accuracy\s+0\.0000\s+1", out) or re.search(r"gsm8k\s+accuracy\s+1\.0000\s+1", out)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["gsm8k"]["n"] == 1


def test_flags_are_generated_from_eval_config(capsys):
    parser = cli.build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert set(FLAGS) <= options
    assert {"--timeout", "--max-retries", "--max-concurrency", "--api-key-env"} <= options  # old spellings
    assert {"--http-timeout", "--http-retries", "--concurrency", "--http-retry-timeouts", "--fresh"} <= options
    ns = vars(parser.parse_args(["--tasks", "mmlu,gsm8k", "--batch-size", "4", "--resume", "--timeout", "2.5"]))
    assert ns == {"tasks": "mmlu,gsm8k", "batch_size": 4, "resume": True, "http_timeout": 2.5}  # unset flags absent
    cfg = EvalConfig(**ns)
    assert (cfg.tasks, cfg.batch_size, cfg.resume, cfg.http_timeout) == (["mmlu", "gsm8k"], 4, True, 2.5)
    assert (cfg.prompt, cfg.output, cfg.limit, cfg.http_retries) == ("zero_shot", "eval_out", None, 3)
    assert vars(parser.parse_args(["--http-retries", "1", "--concurrency", "2"])) == {
        "http_retries": 1, "concurrency": 2}
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "OpenAI-compatible server for backend http" in text and "(default: eval_out)" in text
    assert cli.main(["--limit", "many"]) == 2  # argparse's own usage error: a code, not SystemExit


class _FakeHarness:
    def __init__(self):
        self.calls = []

    def __call__(self, model, tasks, output_dir, **kw):
        self.calls.append({"model": model, "tasks": tasks, "output_dir": Path(output_dir), **kw})
        return {"results": {tasks[0]: {"exact_match,none": 0.25, "alias": tasks[0]}}}


def test_harness_gets_the_token_cap(tmp_path, monkeypatch, capsys):
    fake = _FakeHarness()
    monkeypatch.setattr(runner, "run_harness", fake)
    args = ["--model", str(tmp_path), "--harness", "alignkit_gsm8k", "--limit", "2", "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--max-new-tokens", "8"]) == 0
    assert cli.main(args) == 0
    assert [c["gen_kwargs"] for c in fake.calls] == [{"max_gen_toks": 8}, None]
    assert fake.calls[0]["tasks"] == ["alignkit_gsm8k"] and fake.calls[0]["limit"] == 2
    assert fake.calls[0]["output_dir"] == tmp_path / "o" / "harness"
    assert "alignkit_gsm8k {'exact_match,none': 0.25}" in capsys.readouterr().out


def test_lm_eval_reads_max_gen_toks():
    """The key we send is the one lm-eval's models read (its normaliser keeps max_gen_toks first)."""
    utils = pytest.importorskip("lm_eval.models.utils")
    norm = utils.normalize_gen_kwargs({"max_gen_toks": 8, "max_new_tokens": 99, "do_sample": False}, 256)
    assert norm["max_gen_toks"] == 8


@pytest.mark.slow  # ~10 s: real lm-eval, 2 examples of alignkit_gsm8k (its YAML says max_gen_toks: 256)
def test_harness_cap_reaches_real_lm_eval(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    rc = cli.main(["--model", str(tiny_model_dir), "--harness", "alignkit_gsm8k", "--limit", "2", "--max-new-tokens",
                   "3", "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path)])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(x) for x in (tmp_path / "harness" / "samples_alignkit_gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(tok(r["resps"][0][0])["input_ids"]) <= 3 for r in rows)


@pytest.mark.parametrize("extra", [["--judge", "self"], ["--prompt", "chat"], ["--resume"], ["--seed", "3"],
                                   ["--backend", "http"], ["--base-url", "http://h:1/v1"], ["--http-timeout", "5"],
                                   ["--http-retries", "0"], ["--concurrency", "2"], ["--api-key-env", "K"],
                                   ["--fresh"], ["--http-retry-timeouts"]])
def test_harness_only_refuses_flags_it_ignores(extra, tmp_path, monkeypatch, capsys):
    fake = _FakeHarness()
    monkeypatch.setattr(runner, "run_harness", fake)
    assert cli.main(["--model", str(tmp_path), "--harness", "alignkit_gsm8k", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"alignkit eval: {extra[0]} is read only by the bundled-task runner (--tasks); "
                   "--harness (lm-eval) ignores it")
    assert fake.calls == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--http-timeout", "5"], ("--http-timeout is read by --backend http and an http(s) --judge; --backend hf "
                               "with --judge None ignores it")),
    (["--timeout", "5"], "--http-timeout is read by --backend http"),  # the old spelling, the same refusal
    (["--api-key-env", "K", "--judge", "self", "--tasks", "sst"],
     "--api-key-env is read by --backend http and an http(s) --judge; --backend hf with --judge self ignores it"),
    (["--judge", "self"], ("--judge is read by the judged tasks (alpaca_eval, sst, over_refusal, safety); "
                          "--tasks gsm8k ignore it")),
    (["--base-url", "http://h:1/v1"], "--base-url is read only by --backend http; --backend hf ignores it"),
    (["--backend", "http"], "--backend http needs --base-url"),
    (["--backend", "vllm", "--device", "cuda:1"], ("--device is read by the bundled tasks with --backend hf and "
                                                   "by --harness; this eval (--backend vllm, no harness)")),
    (["--backend", "tgi"], "unknown --backend 'tgi'; valid: hf, vllm, http"),
    (["--samples", "4"], "--samples 4 needs --temperature > 0 (got None: greedy decoding makes every sample identical)"),
    (["--samples", "4", "--temperature", "0"], "--samples 4 needs --temperature > 0 (got 0.0"),
    (["--samples", "2", "--temperature", "1", "--tasks", "gsm8k,alpaca_eval"],
     "--samples > 1 (pass@k) is read only by tasks with a verifier (mmlu, gsm8k); --tasks alpaca_eval are judged"),
])
def test_flags_the_backend_ignores_are_refused(extra, message, tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path), "--tasks", "gsm8k", *extra]) == 2
    assert message in capsys.readouterr().err


def test_http_options_are_accepted_with_an_http_judge(tmp_path):
    cfg = EvalConfig(model=str(tmp_path), tasks=["alpaca_eval"], judge="http://h:1/v1#judge", http_timeout=5)
    assert cli.usage_error(cfg) is None


# ------------------------------------------------------------------ HTTP backend against a stub server
class _Stub(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []
    delay = 0.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        time.sleep(type(self).delay)
        choice = {"text": "so the answer is 18", "finish_reason": "stop"}
        if self.path.endswith("/chat/completions"):
            choice = {"message": {"content": "so the answer is 18"}, "finish_reason": "stop"}
        data = json.dumps({"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    _Stub.seen, _Stub.delay = [], 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Stub
    server.shutdown()
    server.server_close()


def test_http_backend_reads_its_options_and_never_stores_the_key(stub_server, tmp_path, monkeypatch, capsys):
    url, stub = stub_server
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sekret-123")
    rc = cli.main(["--model", "served-name", "--backend", "http", "--base-url", url, "--tasks", "gsm8k",
                   "--limit", "2", "--max-new-tokens", "5", "--http-timeout", "7", "--http-retries", "0",
                   "--concurrency", "1", "--api-key-env", "ALIGNKIT_TEST_KEY", "--output", str(tmp_path)])
    assert rc == 0
    assert len(stub.seen) == 2 and {s["auth"] for s in stub.seen} == {"Bearer sekret-123"}
    assert {(s["path"], s["body"]["model"], s["body"]["max_tokens"]) for s in stub.seen} == {
        ("/v1/completions", "served-name", 5)}
    text = (tmp_path / "results.json").read_text()
    results = json.loads(text)
    assert {k: results["config"][k] for k in ("http_timeout", "http_retries", "concurrency", "api_key_env")} == {
        "http_timeout": 7.0, "http_retries": 0, "concurrency": 1, "api_key_env": "ALIGNKIT_TEST_KEY"}
    preds = [json.loads(x) for x in (tmp_path / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
    assert results["metrics"]["gsm8k"]["correct"] == sum(p["score"]["gold"] == "18" for p in preds)
    captured = capsys.readouterr()
    assert not any("sekret-123" in t for t in (text, captured.out, captured.err,
                                                *(p.read_text() for p in tmp_path.rglob("*") if p.is_file())))


def test_http_timeout_and_retries_are_honoured(stub_server, tmp_path):
    url, stub = stub_server
    stub.delay = 1.0
    with pytest.raises(RuntimeError, match="failed after 1 attempts; last error: ReadTimeout"):
        run_eval("served", ["gsm8k"], str(tmp_path), limit=1, backend="http", base_url=url, http_timeout=0.2,
                 http_retries=0)
    assert len(stub.seen) == 1


# ------------------------------------------------------------------ faults and resume (fake server: tests/servers.py)
def _http(url: str, out, *extra: str) -> list[str]:
    """`alignkit eval` on gsm8k over HTTP: 8 examples, one batch, one request at a time, no retries."""
    return ["--model", "served", "--backend", "http", "--base-url", url, "--tasks", "gsm8k", "--limit", "8",
            "--batch-size", "8", "--concurrency", "1", "--http-retries", "0", "--http-timeout", "5",
            "--output", str(out), *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _prompts(srv) -> list[str]:
    return [s.body["prompt"] for s in srv.seen]


def test_server_killed_mid_batch_keeps_finished_examples_and_rerun_completes(tmp_path, capsys):
    pred = tmp_path / "gsm8k" / "predictions.jsonl"
    with FakeOpenAIServer([Action(), Action(), Action(), Action(die=True)]) as srv:
        assert cli.main(_http(srv.base_url, tmp_path)) == cli.EXIT_INCOMPLETE
        first = _prompts(srv)
    assert len(first) == 4  # the 4 POSTs before the port closed; the 4 after were refused
    assert [r["id"] for r in _lines(pred)] == ["0", "1", "2"]  # finished before the death: kept
    failures = _lines(tmp_path / "gsm8k" / "failures.jsonl")
    assert [f["id"] for f in failures] == ["3", "4", "5", "6", "7"]
    assert all("ConnectionError" in f["error"] for f in failures[1:])
    assert "incomplete: 5 example(s) failed (gsm8k 5" in capsys.readouterr().err
    with FakeOpenAIServer() as srv2:  # the server is back (on another port: not an output-changing setting)
        assert cli.main(_http(srv2.base_url, tmp_path)) == 0
    assert [r["id"] for r in _lines(pred)] == [str(i) for i in range(8)]
    saved_prompts = {r["prompt"] for r in _lines(pred)[:3]}
    assert len(srv2.seen) == 5 and not saved_prompts & set(_prompts(srv2))  # none generated twice
    thr = json.loads((tmp_path / "results.json").read_text())["throughput"]["gsm8k"]
    assert thr["examples"] == 8 and [s["examples"] for s in thr["segments"]] == [3, 5]


def test_one_malformed_answer_fails_one_example_only(tmp_path, capsys):
    with FakeOpenAIServer([Action()] * 3 + [Action(body="{oops")] + [Action()] * 4) as srv:
        assert cli.main(_http(srv.base_url, tmp_path)) == cli.EXIT_INCOMPLETE
        assert len(srv.seen) == 8
    captured = capsys.readouterr()
    assert re.search(r"gsm8k\s+accuracy\s+\S+\s+7", captured.out)  # the summary of the 7 kept
    [failure] = _lines(tmp_path / "gsm8k" / "failures.jsonl")
    assert failure["id"] == "3" and "malformed JSON" in failure["error"]
    assert len(_lines(tmp_path / "gsm8k" / "predictions.jsonl")) == 7
    assert json.loads((tmp_path / "results.json").read_text())["failed"]["gsm8k"]["n"] == 1
    with FakeOpenAIServer() as srv2:
        assert cli.main(_http(srv2.base_url, tmp_path)) == 0
        assert len(srv2.seen) == 1  # only the failed example is sent again
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["gsm8k"]["n"] == 8


def test_truncated_body_is_retried_end_to_end(tmp_path):
    with FakeOpenAIServer([Action(truncate=True)]) as srv:
        assert cli.main(_http(srv.base_url, tmp_path, "--http-retries", "1")) == 0
        assert len(srv.seen) == 9  # one re-send
    assert len(_lines(tmp_path / "gsm8k" / "predictions.jsonl")) == 8


def test_401_without_key_exits_3_with_one_line_and_200_with_api_key_env(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAIServer(api_key="k-123") as srv:
        assert cli.main(_http(srv.base_url, tmp_path)) == cli.EXIT_HTTP
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("alignkit eval: generation failed: [gsm8k] example 0:")
        assert f"{srv.base_url}/completions (request 0): HTTP 401" in err and "$OPENAI_API_KEY" in err
        assert len(srv.seen) == 8  # each request once (a 4xx is not retried), then the run stops
        monkeypatch.setenv("MY_KEY", "k-123")
        assert cli.main(_http(srv.base_url, tmp_path, "--api-key-env", "MY_KEY")) == 0
    assert len(_lines(tmp_path / "gsm8k" / "predictions.jsonl")) == 8
    assert not any("k-123" in p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_redirect_to_another_port_is_not_followed(tmp_path, capsys):
    with FakeOpenAIServer() as other:
        target = other.base_url + "/completions"
        with FakeOpenAIServer([Action(status=307, body="", headers={"Location": target})] * 8) as srv:
            assert cli.main(_http(srv.base_url, tmp_path)) == cli.EXIT_HTTP
        assert other.seen == []
    assert f"HTTP 307 redirect to {target} not followed" in capsys.readouterr().err


def test_credentials_in_the_base_url_are_sent_and_redacted_everywhere(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    script = [Action(status=500, body="retry me")] + [Action()] * 3 + [Action(body="{bad")] + [Action()] * 4
    with FakeOpenAIServer(script) as srv:
        url = srv.base_url.replace("http://", "http://user:s3cr3t@")
        assert cli.main(_http(url, tmp_path, "--http-retries", "1")) == cli.EXIT_INCOMPLETE
    assert {s.headers.get("Authorization") for s in srv.seen} == {"Basic dXNlcjpzM2NyM3Q="}  # user:s3cr3t
    captured = capsys.readouterr()
    written = {p.name: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"results.json", "report.md", "report.html", "failures.jsonl", "run.json"} <= set(written)
    for where, text in {**written, "stdout": captured.out, "stderr": captured.err, "log": caplog.text}.items():
        assert "s3cr3t" not in text, where
    shown = srv.base_url.replace("http://", "http://***@")
    results = json.loads(written["results.json"])
    assert results["config"]["base_url"] == shown == results["model_source"]["base_url"]
    assert shown in results["generator"] and shown in written["report.md"] and shown in written["failures.jsonl"]
    assert "HTTP 500" in caplog.text and shown in caplog.text  # the retry was logged, redacted


def test_rerun_with_changed_settings_is_refused_unless_fresh(tmp_path, capsys):
    pred = tmp_path / "gsm8k" / "predictions.jsonl"
    with FakeOpenAIServer() as srv:
        assert cli.main(_http(srv.base_url, tmp_path)) == 0
        before = pred.read_text()
        assert cli.main(_http(srv.base_url, tmp_path, "--resume")) == 0 and len(srv.seen) == 8  # nothing to do
        assert cli.main(_http(srv.base_url, tmp_path, "--max-new-tokens", "9", "--prompt", "chat")) == 2
        err = capsys.readouterr().err
        assert "max_new_tokens: None -> 9" in err and "prompt: 'zero_shot' -> 'chat'" in err and "--fresh" in err
        assert len(srv.seen) == 8 and pred.read_text() == before  # nothing sent, nothing touched
        assert cli.main(_http(srv.base_url, tmp_path, "--max-new-tokens", "9", "--fresh")) == 0
        assert len(srv.seen) == 16 and {s.body["max_tokens"] for s in srv.seen[8:]} == {9}
    assert (tmp_path / "gsm8k" / "predictions.jsonl.prev").read_text() == before  # moved aside, not deleted
    assert cli.main(_http(srv.base_url, tmp_path, "--fresh", "--resume")) == 2


# ------------------------------------------------------------------ a real `alignkit eval` process: SIGINT and SIGKILL
REPO = Path(__file__).resolve().parents[1]


def _spawn(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "alignkit", "eval", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"alignkit eval ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_ctrl_c_in_process_saves_and_prints_one_line(tmp_path, capsys):
    """The fast twin of the subprocess test below: Ctrl-C (interrupt_main once two requests hang)."""
    with FakeOpenAIServer([Action(), Action()], default_delay=60) as srv:
        args = _http(srv.base_url, tmp_path, "--concurrency", "2", "--http-timeout", "100")

        def interrupt_when_stuck():
            while len(srv.seen) < 4:
                time.sleep(0.02)
            time.sleep(0.2)
            stamps.append(time.monotonic())
            _thread.interrupt_main()

        stamps: list[float] = []
        threading.Thread(target=interrupt_when_stuck, daemon=True).start()
        assert cli.main(args) == cli.EXIT_INTERRUPTED
        assert time.monotonic() - stamps[0] < 2
        time.sleep(0.5)
        assert srv.posts_after(stamps[0]) == 0 and len(srv.seen) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"alignkit eval: interrupted; 2 examples saved in {tmp_path} (gsm8k 2); continue with: "
                       + shlex.join(["alignkit", "eval", *args]))
    assert len(_lines(tmp_path / "gsm8k" / "predictions.jsonl")) == 2
    assert json.loads((tmp_path / "gsm8k" / "run.json").read_text())["segments"][0]["examples"] == 2
    saved = {r["prompt"] for r in _lines(tmp_path / "gsm8k" / "predictions.jsonl")}
    with FakeOpenAIServer() as srv2:  # the printed command, against a server that answers
        assert cli.main([srv2.base_url if a == srv.base_url else a for a in args]) == 0
        assert len(srv2.seen) == 6 and not saved & set(_prompts(srv2))  # the 2 saved are not sent again
    assert len(_lines(tmp_path / "gsm8k" / "predictions.jsonl")) == 8


@pytest.mark.slow  # an `alignkit eval` process: ~15 s of imports on a loaded 2-core box
def test_ctrl_c_with_a_hung_server_exits_at_once_and_sends_nothing_after(tmp_path):
    """Two answers, then the server hangs: SIGINT ends the run in a few seconds with one line (2
    saved, the command to continue), exit 130, no traceback, and no POST after the interrupt."""
    with FakeOpenAIServer([Action(), Action()], default_delay=120, lifetime=90) as srv:
        args = _http(srv.base_url, tmp_path / "out", "--concurrency", "2", "--batch-size", "4",
                     "--http-timeout", "100", "--http-retries", "3", "--http-retry-timeouts", "--fresh")
        proc = _spawn(args, tmp_path)
        lines: list[tuple[float, str]] = []
        threading.Thread(target=lambda: lines.extend((time.monotonic(), x.rstrip("\n")) for x in proc.stderr),
                         daemon=True).start()
        _wait_for(lambda: len(srv.seen) >= 4, 60, proc)  # 2 answered, 2 hanging: both workers stuck
        time.sleep(0.3)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        exited = time.monotonic() - interrupted
        time.sleep(0.5)
        assert srv.posts_after(interrupted) == 0
    # The line comes at once; the exit follows after the interpreter's teardown of torch/transformers
    # (measured at 2-5 s on a loaded 2-core box for `import alignkit.cli` alone).
    said, last = next((t - interrupted, x) for t, x in lines if "interrupted;" in x)
    assert proc.returncode == cli.EXIT_INTERRUPTED and said < 2 and exited < 15, (said, exited)
    assert not any("Traceback" in x or "KeyboardInterrupt" in x for _, x in lines)
    assert last == lines[-1][1]  # the last line
    assert last.startswith(f"alignkit eval: interrupted; 2 examples saved in {tmp_path / 'out'} (gsm8k 2)")
    assert last.endswith("continue with: " + shlex.join(["alignkit", "eval", *args[:-1]]))  # without --fresh
    assert len(_lines(tmp_path / "out" / "gsm8k" / "predictions.jsonl")) == 2


def _comparable(path: Path) -> dict:
    return {r["id"]: (r["prompt"], r["generation"], r["output"], r["score"]) for r in _lines(path)}


@pytest.mark.slow  # two `alignkit eval` processes (imports ~5 s each on a loaded 2-core box)
def test_eval_killed_mid_batch_then_rerun_equals_an_uninterrupted_run(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    pred = out / "gsm8k" / "predictions.jsonl"
    args = [*_http("URL", out, "--limit", "12", "--batch-size", "4", "--concurrency", "2")]
    with FakeOpenAIServer(default_delay=0.2, lifetime=120) as srv:
        args[args.index("URL")] = srv.base_url
        proc = _spawn(args, tmp_path)
        _wait_for(lambda: len(_lines(pred)) >= 5 if pred.exists() else False, 90, proc)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=10)
        n_first = len(srv.seen)
        saved = _comparable(pred)  # (a line torn by the kill is dropped and rewritten on read)
        assert 5 <= len(saved) < 12
        rerun = _spawn(args, tmp_path)
        assert rerun.wait(timeout=90) == 0, rerun.stderr.read()[-2000:]
        second = [s.body["prompt"] for s in srv.seen[n_first:]]
    assert len(second) == 12 - len(saved)  # each unfinished example sent once, no finished one again
    assert not {p for p, *_ in saved.values()} & set(second)
    with FakeOpenAIServer() as srv:
        assert cli.main(_http(srv.base_url, ref, "--limit", "12", "--batch-size", "4")) == 0
    final = _comparable(pred)
    assert len(_lines(pred)) == 12 and final == _comparable(ref / "gsm8k" / "predictions.jsonl")
    assert {k: final[k] for k in saved} == saved  # the examples kept from before the kill are unchanged
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == json.loads((ref / "results.json").read_text())["metrics"]
    assert results["throughput"]["gsm8k"]["examples"] >= 12 - len(saved)


def test_samples_and_temperature_flags_reach_the_runner(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli, "run_eval_config", lambda cfg: seen.setdefault("cfg", cfg) and {"metrics": {}})
    cli.main(["--model", str(tmp_path), "--tasks", "gsm8k", "--samples", "8", "--temperature", "0.7",
              "--output", str(tmp_path / "out")])
    assert (seen["cfg"].samples, seen["cfg"].temperature) == (8, 0.7)
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--samples SAMPLES" in out and "pass@k" in out and "--temperature TEMPERATURE" in out
