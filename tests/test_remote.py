"""`LLMapis.py --engine-url`: a model server that loads no model and delegates generation to another
OpenAI-compatible server — here our own model server with the embedded model, over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest
import requests

from chatglm4 import config as cfg
from chatglm4.conversation import fit_conversation
from chatglm4.engine.remote import RemoteEngine, api_root, estimate_tokens
from chatglm4.engine.scheduler import LocalEngine
from conftest import ROOT, free_port, wait_healthy

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def remote_server(servers, upstream_url: str, **settings):
    from LLMapis import ServerState, create_app, load_remote_kernel

    state = ServerState("remote")
    config = cfg.ModelServerConfig(engine_url=upstream_url + "/v1", default_temperature=0.0, default_max_tokens=64,
                                   **settings)
    state.kernel = load_remote_kernel(config, state)
    server = servers(create_app(state))
    server.state = state
    return server


@pytest.fixture(scope="module")
def remote(model_server, session_servers):
    return remote_server(session_servers, model_server.url)


@pytest.fixture(scope="module")
def client(remote):
    return openai.OpenAI(base_url=remote.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(model_server):
    return openai.OpenAI(base_url=model_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_reads_the_upstream_model_and_context(remote, model_server):
    engine = remote.state.kernel.engine
    assert engine.model == "SmolLM2-135M-Instruct" and remote.state.model_name == engine.model
    assert engine.context_length == model_server.state.kernel.engine.context_length
    card = requests.get(remote.url + "/v1/models", timeout=5).json()["data"][0]
    assert card["id"] == engine.model and card["max_model_len"] == engine.context_length
    health = requests.get(remote.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_passes_through_streamed_and_not(client, direct):
    messages = ask("Name three colours.")
    upstream = direct.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == upstream.choices[0].message.content
    assert whole.usage.prompt_tokens == upstream.usage.prompt_tokens
    assert whole.usage.completion_tokens == upstream.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_json_schema_is_sent_as_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    reply = client.chat.completions.create(model="m", messages=ask("Describe a person as JSON."), max_tokens=60,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "person", "schema": schema}})
    person = json.loads(reply.choices[0].message.content)
    assert set(person) >= {"name", "age"} and isinstance(person["age"], int)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_required_is_relayed(client, stream):
    kwargs = dict(model="m", messages=ask("What is the weather in Paris?"), tools=[WEATHER],
                  # One call: left free, the embedded model goes on calling until max_tokens.
                  tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64)
    if not stream:
        reply = client.chat.completions.create(**kwargs).choices[0]
        calls = reply.message.tool_calls
        assert reply.finish_reason == "tool_calls"
        assert [c.function.name for c in calls] == ["get_weather"]
        assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
        return
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert isinstance(json.loads(arguments)["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.fixture(scope="module")
def schema_client(model_server, session_servers):
    front = remote_server(session_servers, model_server.url, engine_tool_calls="schema")
    return openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_can_travel_as_a_json_schema(schema_client, stream, choice):
    """`--engine-tool-calls schema`: for engines that enforce response_format but not tool_choice."""
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
    kwargs = dict(model="m", messages=ask("What is the weather in Paris?"), tools=[clock, WEATHER],
                  tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=64)
    if not stream:
        reply = schema_client.chat.completions.create(**kwargs).choices[0]
        names = [c.function.name for c in reply.message.tool_calls]
        arguments = json.loads(reply.message.tool_calls[0].function.arguments)
        finish = reply.finish_reason
    else:
        chunks = list(schema_client.chat.completions.create(stream=True, **kwargs))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        names = [d.function.name for d in deltas if d.function.name]
        arguments = json.loads("".join(d.function.arguments or "" for d in deltas))
        finish = chunks[-1].choices[0].finish_reason
    assert finish == "tool_calls" and len(names) == 1 and names[0] in {"get_time", "get_weather"}
    if isinstance(choice, dict):
        assert names == ["get_weather"]
    assert set(arguments) == ({"city"} if names == ["get_weather"] else {"zone"})


def test_forced_call_schema_shapes():
    from chatglm4.engine.remote import forced_call_schema, forced_calls_text

    tools = [WEATHER, {"type": "function", "function": {"name": "noop"}}]
    one = forced_call_schema(tools, {"tool_choice": {"type": "function", "function": {"name": "noop"}}})
    assert one["properties"]["name"] == {"const": "noop"} and one["properties"]["arguments"] == {"type": "object"}
    many = forced_call_schema(tools, {"tool_choice": "required", "parallel_tool_calls": True})
    assert many["type"] == "array" and many["minItems"] == 1 and len(many["items"]["anyOf"]) == 2
    assert forced_call_schema(tools, {"tool_choice": "auto"}) is None
    text = forced_calls_text('[{"name": "get_weather", "arguments": {"city": "巴黎"}}]')
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>'
    assert forced_calls_text('{"name": "get_wea') == ""


def test_history_fitting_uses_an_estimate_when_the_upstream_cannot_count(remote):
    # Our model server has no /tokenize: prompt lengths are estimated, generously.
    engine = remote.state.kernel.engine
    assert engine.tokenizer is None and engine._tokenize_route is None
    assert estimate_tokens("你好世界") == 4 and estimate_tokens("abcdef") == 2
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 300}
            for i in range(20)] + ask("Say OK.")
    kept, prompt = fit_conversation(long, engine.encode_chat, 2000)
    assert 0 < len(prompt) <= 2000 and prompt.messages == kept and kept[-1] == long[-1] and len(kept) < len(long)


def test_book_search_through_a_gateway(remote, serve, tmp_path):
    # Lexical retrieval only (no embedding models to load), with a floor any matching book passes:
    # what is tested is the model's constrained choice through the remote engine.
    gateway = serve.gateway(remote.url, f"sqlite:///{tmp_path / 'catalogue.db'}", embedding_models="",
                            search_floor=0.05)
    asked = remote.state.kernel.engine.stats().prefill_tokens
    r = requests.post(gateway.url + "/api/books/search", json={"query": "帮我找找有关函数求导的书"}, timeout=120)
    assert r.status_code == 200, r.text
    assert remote.state.kernel.engine.stats().prefill_tokens > asked  # the remote engine chose
    catalogue = {b["id"]: b["title"] for b in requests.get(gateway.url + "/api/books?limit=100", timeout=10).json()["books"]}
    assert all(catalogue.get(b["id"]) == b["title"] for b in r.json()["books"])
    page = requests.get(gateway.url + "/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_book_search_task_checks_the_answer(remote):
    books = [{"id": 7, "title": "微积分的秘密：理解极限与导数"}, {"id": 9, "title": "烹饪的艺术"}]
    r = requests.post(remote.url + "/tasks/book_search", json={"query": "求导", "books": books}, timeout=60)
    assert r.status_code == 200, r.text
    assert set(r.json()["ids"]) <= {7, 9}


@pytest.fixture
def small_queue(kernel):
    """An upstream engine of the test's own over the session's weights: one running, one waiting."""
    engine = LocalEngine(kernel.engine.loaded, max_waiting=1, max_batch=1)
    yield engine
    engine.shutdown()


LONG = {"messages": ask("Tell a long story."), "max_tokens": 1000, "ignore_eos": True, "stream": True}


def first_content(resp: requests.Response):
    lines = resp.iter_lines()
    next(l for l in lines if b'"content"' in l and b'"role"' not in l)
    return lines


def test_busy_upstream_is_503_with_retry_after_and_a_gone_client_cancels_upstream(small_queue, serve):
    from LLMkernel import Kernel

    upstream = serve.model_server(Kernel(small_queue, default_temperature=0.0), name="small-queue")
    front = remote_server(serve, upstream.url)
    first = requests.post(front.url + "/v1/chat/completions", json=LONG, stream=True, timeout=60)
    _lines = first_content(first)  # kept: a dropped line iterator closes the stream
    second = requests.post(front.url + "/v1/chat/completions", json=LONG, stream=True, timeout=60)
    third = requests.post(front.url + "/v1/chat/completions", json=LONG, timeout=60)
    assert third.status_code == 503 and third.headers["Retry-After"]
    assert third.json()["error"]["code"] == "queue_full"
    second.close()
    first.close()  # our client goes away: the remote engine closes its upstream response
    deadline = time.monotonic() + 20
    while (small_queue.stats().running or small_queue.stats().waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_queue.stats().running == 0 and small_queue.stats().waiting == 0
    assert small_queue.stats().tokens_generated < 1000


def test_upstream_killed_mid_stream_ends_with_an_error_frame(kernel, serve):
    upstream = serve.model_server(kernel, name="doomed")
    front = remote_server(serve, upstream.url)
    resp = requests.post(front.url + "/v1/chat/completions", json=LONG, stream=True, timeout=60)
    lines = first_content(resp)
    upstream.stop()
    rest = [l for l in lines if l]
    assert rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][len(b"data: "):])
    assert "error" in error and "generation failed" in error["error"]["message"]
    # Down, not busy: /health says so and a new request is a 503 telling the two apart.
    assert requests.get(front.url + "/health", timeout=5).status_code == 503
    r = requests.post(front.url + "/v1/chat/completions", json={"messages": ask("hi")}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_server_unavailable"


def test_request_body_carries_penalties_and_bias_only_when_set(remote):
    from chatglm4.engine import SamplingParams
    from chatglm4.engine.remote import ChatPrompt

    engine = remote.state.kernel.engine
    prompt = ChatPrompt(3, ask("hi"), None)
    path, plain = engine._request_body(prompt, SamplingParams(max_tokens=5))
    assert path == "/v1/chat/completions" and plain["messages"] == ask("hi") and plain["max_tokens"] == 5
    assert not {"presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop"} & set(plain)
    params = SamplingParams(max_tokens=5, stop=["\n"])
    params.presence_penalty, params.repetition_penalty, params.logit_bias = 0.5, 1.1, {42: -100.0}
    _, body = engine._request_body(prompt, params)
    assert body["presence_penalty"] == 0.5 and body["repetition_penalty"] == 1.1
    assert body["logit_bias"] == {"42": -100.0} and body["stop"] == ["\n"]
    grammar = engine.compile_json_schema({"type": "object"})
    _, constrained = engine._request_body(prompt, SamplingParams(max_tokens=5, grammar=grammar))
    assert constrained["response_format"]["type"] == "json_schema" and "guided_json" not in constrained


def test_api_root_takes_the_url_with_or_without_v1():
    assert api_root("http://h:8000/v1") == api_root("http://h:8000/v1/") == api_root("http://h:8000") == "http://h:8000"


def test_the_delegating_server_loads_no_model(model_server, tmp_path):
    """`python LLMapis.py --engine-url` in a process of its own: it serves, and its memory is a
    web server's, not a model's."""
    port = free_port()
    env = {**os.environ, "ENGINE_URL": model_server.url + "/v1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "LLMapis.py"), "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=60)
        r = requests.post(url + "/v1/chat/completions", json={"messages": ask("Hi"), "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "SmolLM2-135M-Instruct"
        with open(f"/proc/{proc.pid}/status") as f:
            rss_kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        (tmp_path / "rss").write_text(str(rss_kb))
        print(f"delegating model server RSS: {rss_kb / 1024:.0f} MiB")
        assert rss_kb < 300 * 1024, f"{rss_kb} kB"
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "libtorch" not in f.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
