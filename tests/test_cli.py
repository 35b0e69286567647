"""The commands a user types: each server as its own process, and the example client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, free_port, wait_healthy

PY = sys.executable


def run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def gateway_process(model_server, tmp_path):
    port = free_port()
    proc = subprocess.Popen([PY, "serveapi.py", "--port", str(port), "--model-server", model_server.url,
                             "--database-url", f"sqlite:///{tmp_path}/cat.db"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "gateway did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_help_lists_every_setting():
    from chatglm4 import config as cfg

    for script, cls in (("serveapi.py", cfg.GatewayConfig), ("LLMapis.py", cfg.ModelServerConfig)):
        out = run(script, "--help", timeout=60)
        assert out.returncode == 0
        for flag, env, _, _ in cfg.settings_table(cls):
            assert flag in out.stdout and env in out.stdout


@pytest.mark.parametrize("script, args, message", [
    ("serveapi.py", ["--port", "99999"], "out of range"),
    ("serveapi.py", ["--model-server", "localhost:8001"], "http://"),
    ("LLMapis.py", ["--model", "/no/such/dir"], "does not exist"),
])
def test_bad_settings_exit_with_a_reason(script, args, message):
    out = run(script, *args, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_testpost_chat_and_search(gateway_process):
    out = run("testpost.py", "--url", gateway_process, "Say hello.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and " s]" in out.stdout
    out = run("testpost.py", "--url", gateway_process, "--stream", "Say hello.")
    assert out.returncode == 0 and "first token" in out.stdout
    out = run("testpost.py", "--url", gateway_process, "--search", "我想学法语")
    assert out.returncode == 0, out.stderr
    assert "法语" in out.stdout
    out = run("testpost.py", "--url", gateway_process, "--search", "有没有关于烹饪的书")
    assert "书籍不存在" in out.stdout


def test_testpost_without_a_gateway_says_so():
    out = run("testpost.py", "--url", f"http://127.0.0.1:{free_port()}", "hi", timeout=60)
    assert out.returncode == 1
    assert "cannot reach the gateway" in out.stderr and "Traceback" not in out.stderr


def test_model_server_process_reports_loading_then_ready():
    port = free_port()
    proc = subprocess.Popen([PY, "LLMapis.py", "--port", str(port), "--max-context", "1024"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=60, expect=503)  # bound before the model loads
        assert requests.get(url + "/health", timeout=5).json()["status"] == "loading"
        wait_healthy(url, timeout=300)
        r = requests.post(url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode in (0, -15)


def _stream(url: str, max_tokens: int) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    resp = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def _until_first_token(lines) -> None:
    next(line for line in lines if b'"content"' in line and b'"role"' not in line)


def test_make_run_launcher_serves_and_stops_both_on_ctrl_c(tmp_path):
    """Ctrl-C: both servers refuse new work at once, finish the streams in flight, then exit."""
    import json
    import signal
    from concurrent.futures import ThreadPoolExecutor

    gw_port, ms_port = free_port(), free_port()
    env = {**os.environ, "GATEWAY_PORT": str(gw_port), "MODEL_SERVER_PORT": str(ms_port),
           "DATABASE_URL": f"sqlite:///{tmp_path}/run.db", "MAX_CONTEXT": "1024", "SHUTDOWN_GRACE_SECONDS": "120"}
    env.pop("MODEL_SERVER_URL", None)
    proc = subprocess.Popen([PY, "-m", "chatglm4.launcher"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{gw_port}"
    try:
        wait_healthy(url, timeout=300)
        r = requests.post(url + "/api/books/search", json={"query": "我想学法语"}, timeout=120)
        assert r.status_code == 200 and r.json()["books"]
        streams = [_stream(url, 16) for _ in range(3)]
        lines = [s.iter_lines() for s in streams]
        for it in lines:
            _until_first_token(it)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while True:  # new work is refused while the streams go on
            refused = requests.get(url + "/api/books", timeout=10)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "shutting_down"
        with ThreadPoolExecutor(3) as pool:
            rests = list(pool.map(lambda it: [line for line in it if line], lines))
        output = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    for rest in rests:  # every stream in flight ran to its end
        assert rest[-1] == b"data: [DONE]"
        usage = json.loads(rest[-2][len(b"data: "):])["usage"]
        assert usage["completion_tokens"] == 16
    assert proc.returncode == 0, output
    assert "ChatGLM4 Web is ready" in output and "nothing left in flight" in output
    for port in (gw_port, ms_port):  # both servers are gone
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_sigterm_gives_up_on_requests_after_the_grace_period(model_server, tmp_path):
    import signal

    port = free_port()
    proc = subprocess.Popen([PY, "serveapi.py", "--port", str(port), "--model-server", model_server.url,
                             "--database-url", f"sqlite:///{tmp_path}/cat.db"], cwd=ROOT,
                            env={**os.environ, "SHUTDOWN_GRACE_SECONDS": "1", "EMBEDDING_MODELS": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=60)
        stream = _stream(url, 2000)  # minutes of text on a CPU
        lines = stream.iter_lines()  # kept: a dropped iterator would close the connection
        _until_first_token(lines)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        took = time.monotonic() - started
        stream.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "still in flight after the 1 s grace period" in output
    assert took < 15
