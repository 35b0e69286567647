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

from bench import libeval
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
        self.app = app
        # Each server gets its own socket map: waitress's default map is process-global, and two
        # loops serving one map interleave their writes.
        self.map: dict = {}
        self.server = make_server(app, "127.0.0.1", self.port, 16, "test-server", socket_map=self.map)
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Closes the listener and every open connection, as a process exit would; once."""
        # A second pull_trigger would write into the wake-up pipe's old fd number, which by then may
        # belong to another file or socket of this process.
        if getattr(self, "_stopped", False):
            return
        self._stopped = True

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
        # A gateway's search index follows its database in background threads: end them too.
        index = getattr(self.app, "extensions", {}).get("chatglm4", {}).get("index")
        if index is not None:
            index.close()
        pool = getattr(self.app, "extensions", {}).get("chatglm4", {}).get("pool")
        if pool is not None:
            pool.close()


@pytest.fixture(scope="session")
def model_config() -> cfg.ModelServerConfig:
    # float32: on a CPU with AMX, bf16 matrix products round differently with the number of rows, so
    # greedy text alone and batched may differ there; the tests that compare them need float32.
    return cfg.ModelServerConfig(max_context=TEST_CONTEXT, default_temperature=0.0, default_max_tokens=64,
                                 dtype="float32")


@pytest.fixture(scope="session")
def kernel(model_config):
    from LLMapis import load_kernel

    return load_kernel(model_config)


class Servers:
    """Starts servers for one test (or session) and stops them all at its end."""

    def __init__(self) -> None:
        self._started: list[ServerThread] = []

    def __call__(self, app, port: int | None = None, healthy: bool = True) -> ServerThread:
        """Serves `app` on loopback; waits for /health to answer 200 unless healthy=False."""
        server = ServerThread(app, port)
        self._started.append(server)
        if healthy:
            wait_healthy(server.url)
        return server

    def model_server(self, kernel, name: str = "SmolLM2-135M-Instruct", **kwargs) -> ServerThread:
        """A model server around `kernel` (None: one still loading)."""
        from LLMapis import ServerState, create_app

        state = ServerState(name)
        state.kernel = kernel
        server = self(create_app(state), healthy=kernel is not None, **kwargs)
        server.state = state
        return server

    def gateway(self, model_url: str, db_url: str, healthy: bool = True, **overrides) -> ServerThread:
        from serveapi import create_app

        return self(create_app(gateway_config(model_url, db_url, **overrides)), healthy=healthy)

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


@pytest.fixture
def serve():
    """A factory of servers (`serve(app)`, `serve.model_server(kernel)`, `serve.gateway(url, db)`),
    every one stopped when the test ends."""
    servers = Servers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def session_servers():
    servers = Servers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def model_server(kernel, session_servers):
    return session_servers.model_server(kernel)


def gateway_config(model_url: str, db_url: str, **overrides) -> cfg.GatewayConfig:
    settings = {"upstream_timeout": 60.0, "connect_timeout": 1.0, **overrides}
    return cfg.GatewayConfig(model_server=model_url, database_url=db_url, **settings)


@pytest.fixture(scope="session")
def gateway(model_server, session_servers, tmp_path_factory):
    db = tmp_path_factory.mktemp("gw") / "catalogue.db"
    return session_servers.gateway(model_server.url, f"sqlite:///{db}")


MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def mysql_connection() -> pymysql.connections.Connection:
    """A server-level connection to the local MariaDB (autocommit)."""
    return pymysql.connect(**MYSQL, connect_timeout=3, charset="utf8mb4", autocommit=True)


def mysql_query(sql: str, params: tuple = ()) -> list[tuple]:
    """Runs one statement on a fresh server-level connection; its rows."""
    conn = mysql_connection()
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def mysql_database_exists(name: str) -> bool:
    return bool(mysql_query("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,)))


@pytest.fixture
def mysql_url():
    """The URL of a MariaDB database of this test's own that does not exist yet (the code under test
    creates it); dropped afterwards."""
    try:
        mysql_connection().close()
    except pymysql.err.OperationalError as error:
        if os.environ.get("CHATGLM4_SKIP_MYSQL") == "1":
            pytest.skip("MariaDB unreachable and CHATGLM4_SKIP_MYSQL=1")
        pytest.fail(f"MariaDB at 127.0.0.1:3306 is unreachable ({error}); .ci/run starts it")
    name = "glm4_test_" + uuid.uuid4().hex[:12]
    assert not mysql_database_exists(name)
    yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    # The name is generated above from hex digits only.
    mysql_query(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path):
    """A URL to a catalogue database that does not exist yet, on SQLite (in a folder not yet made)
    and on MariaDB (dropped afterwards)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sub/catalogue.db"
    return request.getfixturevalue("mysql_url")


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


def eval_cases(name: str = "book_queries.jsonl") -> list[dict]:
    """Public book-search eval cases (skips the test where ../shared/eval is absent)."""
    path = EVAL_DIR / name
    if not path.exists():
        pytest.skip("../shared/eval is not beside this checkout")
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


# The one definition of a correct book-search answer, shared with the benchmark's library eval.
eval_hit = libeval.hit
