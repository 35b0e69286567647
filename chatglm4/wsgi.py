"""The production WSGI server both processes (and the tests) use: waitress, set up for streaming."""

from __future__ import annotations

from typing import Any


def make_server(app: Any, host: str, port: int, threads: int, ident: str, socket_map: dict | None = None) -> Any:
    """A bound (not yet running) waitress server for `app`."""
    import waitress

    # send_bytes=1: waitress otherwise buffers ~18 KB before sending, which stalls SSE streams.
    # channel_request_lookahead=1: waitress keeps reading the socket while the app runs, so it can
    # report a client that went away (environ["waitress.client_disconnected"]) and we cancel its work.
    return waitress.create_server(app, map=socket_map, host=host, port=port, threads=threads, send_bytes=1,
                                  channel_request_lookahead=1, ident=ident)
