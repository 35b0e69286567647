"""download.py end to end: the real modelscope client (run as the real command, in a subprocess)
against a stand-in ModelScope hub on loopback serving a tiny GLM-4-shaped model; then the model
server serves what arrived."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import download
import tiny_glm
from conftest import ROOT, free_port
from modelscope_stub import StubHub

MODEL_ID = download.DEFAULT_MODEL
BIG_FILE = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_glm.build(tmp_path_factory.mktemp("tiny-glm"))


@pytest.fixture
def hub(tiny_model):
    stub = StubHub()
    stub.add_repo(MODEL_ID, tiny_model)
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture
def client_env(tmp_path) -> dict[str, str]:
    """The environment of a fresh machine: the client's cache and config under tmp, loopback unproxied."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSCOPE_")}
    env.update(MODELSCOPE_CACHE=str(tmp_path / "ms-cache"), MODELSCOPE_HOME=str(tmp_path / "ms-home"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


def download_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "download.py"), *args]


def run_download(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(download_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The failure's one line: it is the last line, and the only one download.py writes for it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("download.py:")]
    assert len(ours) == 1 and lines[-1] == ours[0], stderr
    return ours[0]


def assert_same_files(got: Path, want: Path) -> None:
    want_files = {p.relative_to(want).as_posix(): p.read_bytes() for p in want.rglob("*") if p.is_file()}
    got_files = {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()}
    assert got_files == want_files


def test_download_then_serve(hub, client_env, tiny_model, tmp_path, serve):
    dest = tmp_path / "models" / "glm-4-9b-chat-hf"
    env = {**client_env, "MODELSCOPE_ENDPOINT": hub.url}  # the environment variable, not --endpoint
    result = run_download(env, "--local-dir", str(dest))  # no MODEL_ID: the default one
    assert result.returncode == 0, result.stderr
    assert f"serve it with: python LLMapis.py --model {dest}" in result.stdout.splitlines()
    assert_same_files(dest, tiny_model)
    assert all(r.status in (200, 206) for r in hub.log), hub.calls()  # the stub had every route asked for
    assert len(hub.downloads()) == len(list(tiny_model.iterdir()))

    from chatglm4 import config as cfg
    from LLMapis import load_kernel

    kernel = load_kernel(cfg.ModelServerConfig(model=str(dest), default_temperature=0.0, default_max_tokens=8))
    try:
        server = serve.model_server(kernel, name="glm-4-9b-chat-hf")
        chat = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        books = [{"id": 3, "title": "线性代数：从基础到前沿"}, {"id": 7, "title": "法语入门：从字母到会话"},
                 {"id": 12, "title": "微积分入门：函数、极限与导数"}]
        search = requests.post(server.url + "/tasks/book_search", timeout=60,
                               json={"query": "线性代数", "books": books})
        assert search.status_code == 200, search.text
        ids = search.json()["ids"]
        assert isinstance(ids, list) and set(ids) <= {3, 7, 12}
    finally:
        kernel.engine.shutdown()


def test_interrupted_download_resumes(hub, client_env, tiny_model, tmp_path):
    dest = tmp_path / "glm"
    size = (tiny_model / BIG_FILE).stat().st_size
    stall = hub.stall_once(BIG_FILE, after_bytes=size // 2)
    cmd = ("--local-dir", str(dest), "--endpoint", hub.url)
    proc = subprocess.Popen(download_cmd(*cmd), cwd=ROOT, env=client_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert stall.reached.wait(60), "the client never asked for the big file"
        partial = dest / (BIG_FILE + ".incomplete")
        small = [p.name for p in tiny_model.iterdir() if p.name != BIG_FILE]
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.stat().st_size > 0 and all((dest / n).is_file() for n in small)):
            assert time.monotonic() < deadline, "the first half of the big file never reached the disk"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        _, stderr = proc.communicate(timeout=60)
    finally:
        stall.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == download.EXIT_INTERRUPTED, stderr
    assert "re-running the same command resumes" in error_line(stderr)
    assert not (dest / BIG_FILE).exists()
    kept = partial.stat().st_size
    assert 0 < kept < size

    seen = len(hub.log)
    result = run_download(client_env, *cmd)  # the same command again
    assert result.returncode == 0, result.stderr
    assert "complete and verified" in result.stdout
    again = [r for r in hub.log[seen:] if "FilePath" in r.query]
    # Only the unfinished file is asked for again, and only from where it stopped.
    assert [(r.query["FilePath"], r.range, r.status, r.body_bytes) for r in again] == \
        [(BIG_FILE, f"bytes={kept}-", 206, size - kept)]
    assert_same_files(dest, tiny_model)


def test_include_and_exclude_select_files(hub, client_env, tmp_path):
    dest = tmp_path / "some"
    result = run_download(client_env, MODEL_ID, "--local-dir", str(dest), "--endpoint", hub.url,
                          "--include", "*.json", "--exclude", "generation_config.json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]


def test_unknown_model_id_is_one_line(hub, client_env, tmp_path):
    result = run_download(client_env, "Nobody/no-such-model", "--local-dir", str(tmp_path / "x"),
                          "--endpoint", hub.url)
    assert result.returncode == download.EXIT_FAILED
    line = error_line(result.stderr)
    assert line.startswith("download.py: error: model Nobody/no-such-model (revision master) not found at")
    assert result.stderr.strip() == line  # nothing else printed
    assert not (tmp_path / "x").exists()


def test_hub_down_is_one_line(client_env, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_download(client_env, "--local-dir", str(tmp_path / "x"), "--endpoint", endpoint)
    assert result.returncode == download.EXIT_FAILED
    line = error_line(result.stderr)
    assert line.startswith(f"download.py: error: cannot reach the ModelScope hub at {endpoint} (Connection refused)")


@pytest.mark.parametrize("failure, start", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full while writing to"),
    (OSError(errno.EACCES, "Permission denied"), "cannot write to"),
])
def test_write_failures_are_named(failure, start, tmp_path):
    from modelscope_hub import FileDownloadError

    aggregate = FileDownloadError("1 of 6 file(s) failed", failed_files={BIG_FILE: failure}, total=6)
    for exc in (failure, aggregate):
        message = download.describe_failure(exc, model_id=MODEL_ID, revision="master", endpoint="E",
                                            local_dir=tmp_path)
        assert message and "\n" not in message
        assert message.startswith(start) or (exc is aggregate and "re-run the same command" in message)


def test_not_enough_space_fails_before_downloading(tmp_path):
    with pytest.raises(download.DownloadError, match="not enough disk space"):
        download.check_space(tmp_path / "new" / "dir", needed=1 << 62)
