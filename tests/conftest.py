"""Shared fixtures: the embedded model loaded once per session, real servers on free loopback ports,
a SQLite catalogue per gateway and a MariaDB database of the test's own."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pymysql
import pytest
import requests

from chatglm4 import config as cfg

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT.parent / "shared" / "eval"
OUTPUT = ROOT / "test-output"
# A small context keeps the truncation tests quick; everything else fits in it easily.
TEST_CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).status_code == expect:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


class ServerThread:
    """A WSGI app served by waitress on a loopback port in a background thread; stop() closes it."""

    def __init__(self, app, port: int | None = None):
        from chatglm4.wsgi import make_server

        self.port = port or free_port()
        # Each server gets its own socket map: waitress's default map is process-global, and two
        # loops serving one map interleave their writes.
        self.map: dict = {}
        self.server = make_server(app, "127.0.0.1", self.port, 16, "test-server", socket_map=self.map)
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Closes the listener and every open connection, as a process exit would."""

        def close_all() -> None:  # runs inside the server's own loop, so select never sees a closed fd
            for channel in list(self.map.values()):
                channel.close()

        try:
            self.server.trigger.pull_trigger(close_all)
        except OSError:
            # Seen once in a full run: the wake-up pipe's fd was already closed (EBADF). Then the loop
            # cannot be woken, so close everything from here; the loop thread ends on its next poll.
            close_all()
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def model_config() -> cfg.ModelServerConfig:
    return cfg.ModelServerConfig(max_context=TEST_CONTEXT, default_temperature=0.0, default_max_tokens=64)


@pytest.fixture(scope="session")
def kernel(model_config):
    from LLMapis import load_kernel

    return load_kernel(model_config)


@pytest.fixture(scope="session")
def model_server(kernel):
    from LLMapis import ServerState, create_app

    state = ServerState("SmolLM2-135M-Instruct")
    state.kernel = kernel
    server = ServerThread(create_app(state))
    wait_healthy(server.url)
    yield server
    server.stop()


def gateway_config(model_url: str, db_url: str, **overrides) -> cfg.GatewayConfig:
    settings = {"upstream_timeout": 60.0, "connect_timeout": 1.0, **overrides}
    return cfg.GatewayConfig(model_server=model_url, database_url=db_url, **settings)


@pytest.fixture(scope="session")
def gateway(model_server, tmp_path_factory):
    from serveapi import create_app

    db = tmp_path_factory.mktemp("gw") / "catalogue.db"
    server = ServerThread(create_app(gateway_config(model_server.url, f"sqlite:///{db}")))
    wait_healthy(server.url)
    yield server
    server.stop()


def mysql_available() -> bool:
    try:
        pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3).close()
        return True
    except pymysql.err.OperationalError:
        return False


@pytest.fixture
def mysql_url():
    """A MariaDB database name of this test's own (created by the code under test), dropped afterwards."""
    if not mysql_available():
        if os.environ.get("CHATGLM4_SKIP_MYSQL") == "1":
            pytest.skip("MariaDB unreachable and CHATGLM4_SKIP_MYSQL=1")
        pytest.fail("MariaDB at 127.0.0.1:3306 is unreachable (.ci/run starts it)")
    name = "glm4_gw_" + uuid.uuid4().hex[:10]
    yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


def eval_cases() -> list[dict]:
    """The public book-search eval cases (skips the test where ../shared/eval is absent)."""
    path = EVAL_DIR / "book_queries.jsonl"
    if not path.exists():
        pytest.skip("../shared/eval is not beside this checkout")
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def eval_hit(case: dict, ids: list[int]) -> bool:
    """Relevance of one answer: a required book among the ids, or nothing where nothing matches."""
    return bool(set(ids) & set(case.get("must_include_one_of", []))) if case["relevant"] else ids == []
