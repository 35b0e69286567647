"""The engine package's contract: its boundary (nothing heavy outside it), its stop rule, its
shutdown, and isolation (a request whose own state breaks fails alone)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import requests

from chatglm4.engine import EngineBusy, EngineError, FinishReason
from chatglm4.engine.sampling import SamplingParams
from chatglm4.engine.scheduler import LocalEngine, check_stop
from conftest import ROOT


def imported_after(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_gateway_loads_no_torch_transformers_or_xgrammar():
    loaded = imported_after("import serveapi")
    assert not loaded & {"torch", "transformers", "xgrammar"}, loaded & {"torch", "transformers", "xgrammar"}


def test_the_stream_format_does_not_import_the_engine():
    out = subprocess.run([sys.executable, "-c", "import sys, chatglm4.sse; print('chatglm4.engine' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("kwargs, expected", [
    ({}, None),
    ({"end_token": True}, FinishReason.STOP),
    ({"stop_string": True}, FinishReason.STOP),
    ({"grammar_done": True}, FinishReason.STOP),
    ({"generated": 8}, FinishReason.LENGTH),                      # max_tokens reached
    ({"total_tokens": 100}, FinishReason.LENGTH),                 # context full
    ({"end_token": True, "generated": 8}, FinishReason.STOP),     # a stop on the last allowed token is a stop
])
def test_check_stop(kwargs, expected):
    args = {"end_token": False, "stop_string": False, "grammar_done": False, "generated": 3, "max_tokens": 8,
            "total_tokens": 50, "context_length": 100, **kwargs}
    assert check_stop(**args) == expected


@pytest.fixture
def engine(kernel):
    """A private engine over the session's model, shut down after the test."""
    engine = LocalEngine(kernel.engine.loaded, max_waiting=4, max_batch=2)
    yield engine
    engine.shutdown()


def prompt(engine, text: str = "Tell a long story.") -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def test_shutdown_ends_running_and_waiting_streams(engine):
    streams = [engine.generate(prompt(engine), SamplingParams(max_tokens=10_000, ignore_eos=True)) for _ in range(4)]
    first = iter(streams[0])
    next(first)  # the batch is generating (2 running, 2 waiting)
    errors: list[BaseException] = []

    def drain(stream) -> None:
        try:
            stream.collect()
        except EngineError as exc:
            errors.append(exc)

    readers = [threading.Thread(target=drain, args=(s,)) for s in streams[1:]]
    for r in readers:
        r.start()
    engine.shutdown()
    for r in readers:
        r.join(timeout=10)
    assert not any(r.is_alive() for r in readers), "a reader still blocks after shutdown"
    with pytest.raises(EngineError):
        list(first)
    assert len(errors) == 3
    with pytest.raises(EngineBusy):
        engine.generate(prompt(engine), SamplingParams(max_tokens=1))


POISON = [
    # Each breaks only its own request's state inside the engine.
    pytest.param(SamplingParams(max_tokens=8, temperature=0.8, seed=2 ** 64), id="seed-beyond-64-bits"),
    pytest.param(SamplingParams(max_tokens=8, temperature=0.8, top_p=float("nan")), id="nan-top-p"),
    pytest.param(SamplingParams(max_tokens=8, temperature=float("inf")), id="infinite-temperature"),
]


@pytest.mark.parametrize("poison", POISON)
def test_a_poisoned_request_fails_alone(kernel, poison):
    engine = LocalEngine(kernel.engine.loaded, max_batch=8)
    try:
        healthy_params = SamplingParams(max_tokens=24, ignore_eos=True)
        solo = engine.generate(prompt(engine, "Count to ten."), healthy_params).collect().text
        healthy = [engine.generate(prompt(engine, "Count to ten."), healthy_params) for _ in range(3)]
        bad = engine.generate(prompt(engine, "Count to ten."), poison)
        outcome = "completed"
        try:
            bad.collect()
        except EngineError:
            outcome = "failed"
        results = [s.collect() for s in healthy]
        assert [r.text for r in results] == [solo] * 3
        assert all(r.completion_tokens == 24 for r in results)
        # It may be refused or may degrade to something valid, but never take the others down.
        assert outcome in ("failed", "completed")
    finally:
        engine.shutdown()


def test_tiny_temperature_is_greedy(kernel):
    engine = kernel.engine
    ids = prompt(engine, "Name a colour.")
    greedy = engine.generate(ids, SamplingParams(max_tokens=12)).collect().text
    tiny = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1e-309, seed=1)).collect().text
    assert tiny == greedy


@pytest.mark.parametrize("body, status", [
    ({"seed": 2 ** 64}, 422),
    ({"seed": -(2 ** 63) - 1}, 422),
    ({"seed": 2 ** 64 - 1, "temperature": 0.7}, 200),
    ({"temperature": 1e-309}, 200),
])
def test_seed_and_temperature_edges_over_http(model_server, body, status):
    r = requests.post(model_server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})
    assert r.status_code == status, r.text
    assert requests.get(model_server.url + "/health", timeout=5).status_code == 200


def test_a_failed_load_says_unavailable_with_the_reason(serve):
    from chatglm4 import config as cfg
    from LLMapis import ServerState, create_app, load_in_background

    def out_of_memory(_config):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    state = ServerState("doomed")
    load_in_background(cfg.ModelServerConfig(), state, out_of_memory).join(timeout=10)
    server = serve(create_app(state), healthy=False)
    r = requests.get(server.url + "/health", timeout=5)
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable" and "CUDA out of memory" in r.json()["detail"]["error"]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                      timeout=5)
    assert r.status_code == 503 and "CUDA out of memory" in r.json()["error"]["message"]
