"""The gateway's replica pool over real HTTP: two model servers (sharing the session's model) behind
one gateway — least requests in flight first, conversations stay on their replica, a replica that
dies or is still loading costs no request."""

from __future__ import annotations

import re
import time

import pytest
import requests

from chatglm4.upstream import conversation_key

LONG = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1000, "ignore_eos": True,
        "stream": True}


@pytest.fixture
def replicas(kernel, serve, tmp_path):
    a, b = serve.model_server(kernel), serve.model_server(kernel)
    gateway = serve.gateway(f"{a.url},{b.url}", f"sqlite:///{tmp_path / 'catalogue.db'}", embedding_models="")
    return a, b, gateway


def replica_metrics(gateway) -> dict[str, list[float]]:
    """{"in_flight": [replica 0, replica 1], "served": [...]} from the gateway's /metrics."""
    text = requests.get(gateway.url + "/metrics", timeout=5).text
    out = {"in_flight": [0.0, 0.0], "served": [0.0, 0.0]}
    for name, key in (("chatglm4_gateway_replica_in_flight", "in_flight"),
                      ("chatglm4_gateway_replica_requests_total", "served")):
        for i, value in re.findall(name + r'\{replica="(\d)"\} ([0-9.e+]+)', text):
            out[key][int(i)] = float(value)
    return out


def short(gateway, content: str = "Hi", **headers) -> requests.Response:
    r = requests.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r


def open_stream(gateway, content: str = "Tell a long story."):
    """A long stream that is generating; keep what this returns (a dropped line iterator closes it)."""
    body = {**LONG, "messages": [{"role": "user", "content": content}]}
    resp = requests.post(gateway.url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    lines = resp.iter_lines()
    next(l for l in lines if b'"content"' in l and b'"role"' not in l)
    return resp, lines


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_least_loaded_replica_gets_the_requests_and_in_flight_is_visible(replicas):
    _, _, gateway = replicas
    first, _first_lines = open_stream(gateway)
    m = replica_metrics(gateway)
    busy = m["in_flight"].index(1.0)
    idle = 1 - busy
    assert m["in_flight"][idle] == 0
    for i in range(4):  # distinct conversations: no affinity to keep them anywhere
        short(gateway, f"Question {i}")
    m = replica_metrics(gateway)
    assert m["served"][idle] == 4 and m["served"][busy] == 1
    # Another conversation goes where nothing runs: one each now.
    second, _second_lines = open_stream(gateway, "Tell another long story.")
    assert replica_metrics(gateway)["in_flight"] == [1.0, 1.0]
    first.close()
    second.close()
    wait_until(lambda: replica_metrics(gateway)["in_flight"] == [0.0, 0.0])


def test_a_conversation_sticks_to_its_replica(replicas):
    _, _, gateway = replicas
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for turn in range(3):
        r = requests.post(gateway.url + "/v1/chat/completions", timeout=60,
                          json={"messages": history, "max_tokens": 1})
        assert r.status_code == 200
        history = history + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": f"More {turn}"}]
    served = replica_metrics(gateway)["served"]
    assert sorted(served) == [0, 3]  # idle replicas alone would have taken turns
    for i in range(3):  # a session header keeps different conversations together too
        short(gateway, f"Other {i}", **{"X-Session-ID": "user-42"})
    assert sorted(replica_metrics(gateway)["served"]) in ([0, 6], [3, 3])
    assert conversation_key(history) == conversation_key(history[:2])


def test_a_replica_killed_mid_run_costs_no_request(replicas):
    _, b, gateway = replicas
    for i in range(2):
        short(gateway, f"Before {i}")
    assert replica_metrics(gateway)["served"] == [1, 1]
    b.stop()
    for i in range(6):  # every one reaches the replica left: refused connections are retried there
        short(gateway, f"After {i}")
    assert replica_metrics(gateway)["served"] == [7, 1]


def test_a_loading_replica_is_skipped(kernel, serve, tmp_path):
    loading, ready = serve.model_server(None, name="late"), serve.model_server(kernel)
    gateway = serve.gateway(f"{loading.url},{ready.url}", f"sqlite:///{tmp_path / 'catalogue.db'}",
                            embedding_models="")
    requests.get(gateway.url + "/health", timeout=10)  # reads every replica's /health, as the poll does
    for i in range(3):
        short(gateway, f"Q {i}")
    assert replica_metrics(gateway)["served"] == [0, 3]
