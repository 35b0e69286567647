"""The gateway's client of the model servers: sends each request to the least-loaded healthy replica
(a conversation stays on its replica while that is healthy, so its prefix cache is reused), retries
on another replica what never reached one, gives up within a bounded time, and turns every failure
into a status the gateway can answer with."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

import requests
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .errors import APIError, Unavailable

log = logging.getLogger(__name__)

# A replica that refused a connection is skipped for this long before it is tried again.
COOLDOWN_S = 5.0
# How often each replica's /health is read in the background (one small GET each).
HEALTH_POLL_S = 2.0
# Conversations remembered for affinity (least recently used forgotten first).
AFFINITY_ENTRIES = 10_000
# A conversation leaves its replica when that one has this many more requests in flight than the
# least-loaded: a cached prefix is worth less than waiting behind a queue.
AFFINITY_SLACK = 8
# A replica's 503 with one of these codes means it took nothing on: the request goes to another.
NOT_STARTED = ("queue_full", "loading", "shutting_down")


class UpstreamError(APIError):
    """A model server answered with an error of its own; relayed with its status and message."""

    def __init__(self, status: int, message: str, type_: str, retry_after: int | None = None,
                 code: str | None = None):
        super().__init__(message, retry_after=retry_after, code=code)
        self.status = status
        self.type = type_


def conversation_key(messages: Iterable[dict]) -> str:
    """A conversation's identity for affinity: its system prompt and first user turn, which every later
    request of the same conversation repeats."""
    head, users = [], 0
    for m in messages:
        head.append([m.get("role"), m.get("content")])
        users += m.get("role") == "user"
        if users:
            break
    return hashlib.sha256(json.dumps(head, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


class ModelServerPool:
    """Model-server replicas, chosen by fewest requests in flight (ties in turn), with affinity."""

    def __init__(self, urls: list[str], *, connect_timeout: float = 2.0, read_timeout: float = 120.0,
                 health_poll: float | None = HEALTH_POLL_S):
        self.urls = urls
        self.timeout = (connect_timeout, read_timeout)
        self.in_flight = {u: 0 for u in urls}
        self.served = {u: 0 for u in urls}
        self._down_until: dict[str, float] = {}
        self._state = {u: "ok" for u in urls}   # what each replica's /health last said
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._turn = 0
        self._lock = threading.Lock()
        self._session = requests.Session()
        # Many gateway threads share one session: size its pool so they don't queue for sockets.
        adapter = requests.adapters.HTTPAdapter(pool_connections=len(urls), pool_maxsize=64)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._closed = threading.Event()
        if health_poll and len(urls) > 1:  # with one replica there is nothing to choose
            threading.Thread(target=self._poll, args=(health_poll,), name="replica-health", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------ choosing

    def _usable(self, url: str, now: float) -> bool:
        return self._down_until.get(url, 0) <= now and self._state[url] == "ok"

    def _order(self, affinity: str | None) -> list[str]:
        """Replicas to try, best first: the conversation's own, then least in flight (ties taken in
        turn), then those marked down or loading, as a last resort."""
        now = time.monotonic()
        with self._lock:
            self._turn = (self._turn + 1) % len(self.urls)
            rotated = self.urls[self._turn:] + self.urls[:self._turn]
            usable = sorted((u for u in rotated if self._usable(u, now)), key=lambda u: self.in_flight[u])
            if affinity is not None and usable:
                pinned = self._sticky.get(affinity)
                if pinned in usable and self.in_flight[pinned] <= self.in_flight[usable[0]] + AFFINITY_SLACK:
                    usable.remove(pinned)
                    usable.insert(0, pinned)
                self._sticky[affinity] = usable[0]
                self._sticky.move_to_end(affinity)
                while len(self._sticky) > AFFINITY_ENTRIES:
                    self._sticky.popitem(last=False)
        return usable + [u for u in rotated if u not in usable]

    def _mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + COOLDOWN_S

    def _begin(self, url: str) -> None:
        with self._lock:
            self.in_flight[url] += 1

    def _end(self, url: str) -> None:
        with self._lock:
            self.in_flight[url] -= 1

    # ------------------------------------------------------------ requests

    def request(self, method: str, path: str, *, json: Any = None, stream: bool = False,
                read_timeout: float | None = None, affinity: str | None = None) -> requests.Response:
        """The first replica's answer (2xx), or UpstreamError / Unavailable; never hangs past the
        timeouts. A streamed answer counts as in flight until it is closed."""
        timeout = (self.timeout[0], read_timeout or self.timeout[1])
        last: APIError = Unavailable("no model server configured", retry_after=5, code="model_server_unavailable")
        for url in self._order(affinity):
            self._begin(url)
            try:
                resp = self._session.request(method, url + path, json=json, stream=stream, timeout=timeout)
            except requests.ConnectionError as exc:
                # No answer came back, so nothing was relayed: the next replica can take it.
                # (A read timeout on a streamed body surfaces later, not here.)
                # Public messages name no internal address; the log does.
                self._end(url)
                self._mark_down(url)
                last = Unavailable("the model server is unreachable", retry_after=5, code="model_server_unavailable")
                log.warning("model server %s unreachable: %s", url, exc.__class__.__name__)
                continue
            except requests.Timeout:
                self._end(url)
                log.warning("model server %s timed out after %s s", url, timeout[1])
                raise Unavailable(f"the model server did not answer within {timeout[1]:g} s",
                                  retry_after=10, code="upstream_timeout") from None
            self._down_until.pop(url, None)
            self.served[url] += 1
            if resp.status_code >= 400:
                self._end(url)
                error = _relay_error(resp)
                if resp.status_code == 503 and error.code in NOT_STARTED:
                    if error.code == "loading":
                        self._state[url] = "loading"
                        error = Unavailable("the model server is still loading the model", retry_after=5,
                                            code="model_server_unavailable")
                    last = error
                    continue
                raise error
            if stream:
                _on_close(resp, lambda url=url: self._end(url))
            else:
                self._end(url)
            return resp
        raise last

    # ------------------------------------------------------------ health

    def _poll(self, every: float) -> None:
        while not self._closed.wait(every):
            self.health()

    def health(self) -> dict[str, dict]:
        """Each replica's /health answer (or why there is none); remembered for choosing."""
        out = {}
        for url in self.urls:
            try:
                resp = self._session.get(url + "/health", timeout=(self.timeout[0], 5))
                body = resp.json()
                out[url] = {"ok": resp.status_code == 200, "status": body.get("status", resp.status_code),
                            "in_flight": self.in_flight[url]}
            except (requests.RequestException, ValueError, AttributeError) as exc:
                out[url] = {"ok": False, "status": "unreachable", "reason": exc.__class__.__name__}
            # Unreachable is left to the connect-failure cooldown: a refused connection costs nothing.
            self._state[url] = "ok" if out[url]["ok"] or out[url]["status"] == "unreachable" else "unavailable"
        return out


def _on_close(resp: requests.Response, release: Any) -> None:
    """Calls `release` once when the streamed response is closed (the gateway closes every relay)."""
    close = resp.close
    done = threading.Event()

    def closing() -> None:
        try:
            close()
        finally:
            if not done.is_set():
                done.set()
                release()

    resp.close = closing


class PoolCollector:
    """/metrics: each replica's requests in flight and served, by position in MODEL_SERVER_URL (the
    public metrics name no internal address)."""

    def __init__(self, pool: ModelServerPool):
        self.pool = pool

    def collect(self):
        in_flight = GaugeMetricFamily("chatglm4_gateway_replica_in_flight", "requests in flight per model server",
                                      labels=["replica"])
        served = CounterMetricFamily("chatglm4_gateway_replica_requests", "requests each model server answered",
                                     labels=["replica"])
        for i, url in enumerate(self.pool.urls):
            in_flight.add_metric([str(i)], self.pool.in_flight[url])
            served.add_metric([str(i)], self.pool.served[url])
        yield in_flight
        yield served


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
