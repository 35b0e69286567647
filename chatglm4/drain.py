"""A graceful stop for both servers: on SIGTERM (or Ctrl-C) stop taking new work, let what is in
flight finish within a grace period, then exit. A second signal stops at once.

Requests are counted at the WSGI edge, from the call until the server closes the response
iterable, so a streamed reply counts until its last frame is sent."""

from __future__ import annotations

import _thread
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterable

from .errors import error_body

log = logging.getLogger(__name__)

# After the last response is handed to waitress, its main loop still has to write the final bytes
# (a stream's `data: [DONE]`) to the socket: a moment's wait before closing it.
FLUSH_S = 0.5

# Served while draining, so monitoring can watch the stop; everything else (/health too, so a load
# balancer takes this replica out) answers 503.
EXEMPT_PATHS = ("/metrics",)

_REFUSAL = json.dumps(error_body("the server is shutting down; retry on another replica or later",
                                 "service_unavailable", "shutting_down")).encode()


class Drain:
    """Counts requests in flight and refuses new ones once `start()` is called."""

    def __init__(self, grace: float):
        self.grace = grace
        self._in_flight = 0
        self._changed = threading.Condition()
        self._draining = threading.Event()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self._in_flight

    def start(self) -> None:
        self._draining.set()

    def wait(self) -> bool:
        """Blocks until nothing is in flight (True) or the grace period is over (False)."""
        deadline = time.monotonic() + self.grace
        with self._changed:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _finished(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def wrap(self, app: Callable) -> Callable:
        """The WSGI app `app`, counted and refusing new requests while draining."""

        def counted(environ: dict, start_response: Callable) -> Iterable[bytes]:
            if self.draining and environ.get("PATH_INFO") not in EXEMPT_PATHS:
                start_response("503 SERVICE UNAVAILABLE", [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(_REFUSAL))),
                    ("Retry-After", "5"), ("X-Content-Type-Options", "nosniff")])
                return [_REFUSAL]
            with self._changed:
                self._in_flight += 1
            try:
                body = app(environ, start_response)
            except BaseException:
                self._finished()
                raise
            return _Counted(body, self._finished)

        return counted


class _Counted:
    """A response iterable that reports, once, when the server closes it."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]):
        self._body = body
        self._done: Callable[[], None] | None = done

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


def serve(server: Any, drain: Drain, name: str, after_drain: Callable[[], None] = lambda: None) -> None:
    """Runs the waitress `server` on this (the main) thread until a signal has drained it.

    The first SIGTERM/SIGINT starts draining on a helper thread, which then runs `after_drain` (e.g.
    the engine's shutdown) and interrupts the main thread; waitress answers that by closing its
    sockets. A second signal interrupts at once."""

    def finish() -> None:
        drained = drain.wait()
        if drained:
            log.info("%s: nothing left in flight; exiting", name)
        else:
            log.warning("%s: %d request(s) still in flight after the %g s grace period; exiting anyway",
                        name, drain.in_flight, drain.grace)
        try:
            after_drain()
            time.sleep(FLUSH_S)
        finally:
            _thread.interrupt_main()

    def on_signal(signum: int, _frame: Any) -> None:
        if drain.draining:
            raise KeyboardInterrupt
        log.info("%s: %s received; refusing new work, finishing %d request(s) in flight (grace %g s)",
                 name, signal.Signals(signum).name, drain.in_flight, drain.grace)
        drain.start()
        threading.Thread(target=finish, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()  # waitress closes itself on KeyboardInterrupt and returns
