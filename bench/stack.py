"""A model server and a gateway in this process, on loopback, over a catalogue of given books: what
the library eval and the catalogue benchmark drive."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serves a WSGI app on a free loopback port until the block ends; yields its URL."""
    from chatglm4.wsgi import make_server

    socket_map: dict = {}
    port = free_port()
    server = make_server(app, "127.0.0.1", port, 32, "bench", socket_map=socket_map)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.trigger.pull_trigger(lambda: [c.close() for c in list(socket_map.values())])
        thread.join(timeout=10)


@contextlib.contextmanager
def library_stack(books: list[dict], *, model_choice: str = "on", embedding_cache: str | None = None,
                  **gateway_settings) -> Iterator[str]:
    """A gateway (and model server) whose catalogue holds exactly `books`, ids 1..n in order; yields
    the gateway's URL once its search index is built and embedded."""
    import LLMapis
    import serveapi
    from chatglm4 import config as cfg
    from chatglm4.catalogue import Catalogue
    from chatglm4.protocol import NewBook

    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/library.db"
        catalogue = Catalogue(db, seed_titles=[])
        catalogue.init_schema()
        catalogue.add_books([NewBook.model_validate({k: v for k, v in b.items() if k != "id"}) for b in books])
        state = LLMapis.ServerState("SmolLM2-135M-Instruct")
        state.kernel = LLMapis.load_kernel(cfg.ModelServerConfig(default_temperature=0.0))
        with serving(LLMapis.create_app(state)) as model_url:
            config = cfg.GatewayConfig(model_server=model_url, database_url=db, search_model_choice=model_choice,
                                       embedding_cache=embedding_cache or str(Path(tmp) / "embeddings.sqlite"),
                                       **gateway_settings)
            app = serveapi.create_app(config, catalogue=catalogue)
            index = app.extensions["chatglm4"]["index"]
            with serving(app) as url:
                wait_ready(url)
                index.wait_ready(600)
                while index.progress()["pending_embeddings"] or any(
                        n < len(books) for n in index.progress()["embedded"].values()):
                    time.sleep(0.5)
                yield url
            index.close()
        state.kernel.engine.shutdown()
