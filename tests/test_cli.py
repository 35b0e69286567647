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


def test_make_run_launcher_serves_and_stops_both_on_ctrl_c(tmp_path):
    import signal

    gw_port, ms_port = free_port(), free_port()
    env = {**os.environ, "GATEWAY_PORT": str(gw_port), "MODEL_SERVER_PORT": str(ms_port),
           "DATABASE_URL": f"sqlite:///{tmp_path}/run.db", "MAX_CONTEXT": "1024"}
    env.pop("MODEL_SERVER_URL", None)
    proc = subprocess.Popen([PY, "-m", "chatglm4.launcher"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{gw_port}", timeout=300)
        r = requests.post(f"http://127.0.0.1:{gw_port}/api/books/search", json={"query": "我想学法语"}, timeout=120)
        assert r.status_code == 200 and r.json()["books"]
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "ChatGLM4 Web is ready" in output
    for port in (gw_port, ms_port):  # both servers are gone
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
