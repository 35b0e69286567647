"""The gateway's client of the model servers: spreads requests over healthy replicas, gives up
within a bounded time, and turns every failure into a status the gateway can answer with."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import requests

from .errors import APIError, Unavailable

log = logging.getLogger(__name__)

# A replica that refused a connection is skipped for this long before it is tried again.
COOLDOWN_S = 5.0


class UpstreamError(APIError):
    """A model server answered with an error of its own; relayed with its status and message."""

    def __init__(self, status: int, message: str, type_: str, retry_after: int | None = None,
                 code: str | None = None):
        super().__init__(message, retry_after=retry_after, code=code)
        self.status = status
        self.type = type_


class ModelServerPool:
    """Round-robin over model-server URLs, skipping replicas that recently failed to connect."""

    def __init__(self, urls: list[str], *, connect_timeout: float = 2.0, read_timeout: float = 120.0):
        self.urls = urls
        self.timeout = (connect_timeout, read_timeout)
        self._down_until: dict[str, float] = {}
        self._cycle = itertools.cycle(range(len(urls)))
        self._lock = threading.Lock()
        self._session = requests.Session()
        # Many gateway threads share one session: size its pool so they don't queue for sockets.
        adapter = requests.adapters.HTTPAdapter(pool_connections=len(urls), pool_maxsize=64)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _order(self) -> list[str]:
        with self._lock:
            start = next(self._cycle)
        ordered = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        healthy = [u for u in ordered if self._down_until.get(u, 0) <= now]
        return healthy + [u for u in ordered if u not in healthy]

    def _mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + COOLDOWN_S

    def request(self, method: str, path: str, *, json: Any = None, stream: bool = False,
                read_timeout: float | None = None) -> requests.Response:
        """The first replica's answer (2xx), or UpstreamError / Unavailable; never hangs past the timeouts."""
        timeout = (self.timeout[0], read_timeout or self.timeout[1])
        last_reason = "no model server configured"
        for url in self._order():
            try:
                resp = self._session.request(method, url + path, json=json, stream=stream, timeout=timeout)
            except requests.ConnectionError as exc:
                # A read timeout on a streamed body surfaces later; here it means no connection at all.
                # Public messages name no internal address; the log does.
                self._mark_down(url)
                last_reason = "the model server is unreachable"
                log.warning("model server %s unreachable: %s", url, exc.__class__.__name__)
                continue
            except requests.Timeout:
                log.warning("model server %s timed out after %s s", url, timeout[1])
                raise Unavailable(f"the model server did not answer within {timeout[1]:g} s",
                                  retry_after=10, code="upstream_timeout") from None
            self._down_until.pop(url, None)
            if resp.status_code == 503 and _error_code(resp) == "loading":
                last_reason = "the model server is still loading the model"
                resp.close()
                continue
            if resp.status_code >= 400:
                raise _relay_error(resp)
            return resp
        raise Unavailable(last_reason, retry_after=5, code="model_server_unavailable")

    def health(self) -> dict[str, dict]:
        """Each replica's /health answer (or why there is none)."""
        out = {}
        for url in self.urls:
            try:
                resp = self._session.get(url + "/health", timeout=(self.timeout[0], 5))
                body = resp.json()
                out[url] = {"ok": resp.status_code == 200, "status": body.get("status", resp.status_code)}
            except (requests.RequestException, ValueError) as exc:
                out[url] = {"ok": False, "status": "unreachable", "reason": exc.__class__.__name__}
        return out


def _error_code(resp: requests.Response) -> str | None:
    try:
        return resp.json()["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _relay_error(resp: requests.Response) -> APIError:
    """The model server's error as the gateway's, keeping its status class, message and `code`
    (so a client can tell `queue_full` from `model_server_unavailable`)."""
    code = None
    try:
        err = resp.json()["error"]
        message, type_ = str(err["message"]), str(err.get("type", "upstream_error"))
        code = err.get("code") if isinstance(err.get("code"), str) else None
    except (ValueError, KeyError, TypeError):
        message, type_ = f"model server answered {resp.status_code}", "upstream_error"
    finally:
        resp.close()
    if resp.status_code >= 500:
        retry = resp.headers.get("Retry-After")
        if resp.status_code == 503:
            return Unavailable(message, retry_after=int(retry) if retry and retry.isdigit() else 5,
                               code=code or "model_server_unavailable")
        return UpstreamError(502, f"model server error: {message}", "upstream_error", code=code)
    return UpstreamError(resp.status_code, message, type_, code=code)
