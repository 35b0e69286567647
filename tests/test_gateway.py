"""The gateway over real HTTP, in front of the real model server: every route, every error status,
the model server going away and coming back, injection through every string field, MySQL."""

from __future__ import annotations

import json
import re
import time

import openai
import pytest
import requests

from chatglm4.catalogue import Catalogue, load_seed_titles
from conftest import eval_cases, eval_hit, ServerThread, free_port, gateway_config, wait_healthy
from stubs import StubPool

SEED_TITLES = load_seed_titles()


def sqlite_url(tmp_path) -> str:
    """A SQLite catalogue of the test's own."""
    return f"sqlite:///{tmp_path}/catalogue.db"


def assert_error(r, status: int) -> dict:
    """`r`: a requests response, or a Flask test client's (both have .status_code, .headers, .text)."""
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = json.loads(r.text)["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


# ---------------------------------------------------------------- routes


def test_api_chat_answers_in_the_demo_shape(gateway):
    r = requests.post(gateway.url + "/api/chat", json={"prompt": "Hello!", "max_tokens": 16}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["respond"], str) and body["respond"]
    assert body["usage"]["completion_tokens"] > 0


def test_api_chat_with_history_and_stream(gateway):
    body = {"prompt": "And what is 3+3?", "stream": True, "max_tokens": 12,
            "history": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    with requests.post(gateway.url + "/api/chat", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        frames = [l[6:] for l in r.iter_lines() if l.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_openai_sdk_through_the_gateway(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"
    kwargs = dict(model="any", messages=[{"role": "user", "content": "Name a fruit."}], temperature=0, max_tokens=16)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert whole and streamed == whole


def test_book_search_is_valid_and_grounded_on_the_eval(gateway, output_dir):
    catalogue = {i: t for i, t in enumerate(SEED_TITLES, start=1)}
    record = []
    for case in eval_cases():
        started = time.perf_counter()
        r = requests.post(gateway.url + "/api/books/search", json={"query": case["query"]}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"books", "message"} and isinstance(body["message"], str)
        for book in body["books"]:
            assert set(book) == {"id", "title", "author", "subjects", "year", "isbn", "description"} and catalogue[book["id"]] == book["title"]
        ids = [b["id"] for b in body["books"]]
        if not ids:
            assert body["message"] == "书籍不存在"
        if not case["relevant"]:
            assert ids == []
        hit = eval_hit(case, ids)
        record.append({"query": case["query"], "ids": ids, "hit": hit,
                       "seconds": round(time.perf_counter() - started, 2)})
    (output_dir / "relevance_gateway.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))


def test_catalogue_crud(gateway):
    url = gateway.url + "/api/books"
    page = requests.get(url, params={"offset": 20, "limit": 3}, timeout=10).json()
    assert page["offset"] == 20 and page["limit"] == 3 and len(page["books"]) == 3 and page["total"] >= 25
    r = requests.post(url, json={"titles": ["烹饪的艺术：家常菜谱", "  Python 编程入门  "]}, timeout=10)
    assert r.status_code == 201
    added = r.json()["books"]
    assert [b["title"] for b in added] == ["烹饪的艺术：家常菜谱", "Python 编程入门"]
    again = requests.post(url, json={"titles": ["烹饪的艺术：家常菜谱"]}, timeout=10).json()["books"]
    assert again[0]["id"] == added[0]["id"]  # adding an existing title keeps its id
    found = requests.post(gateway.url + "/api/books/search", json={"query": "有没有关于烹饪的书"}, timeout=120).json()
    assert added[0]["id"] in [b["id"] for b in found["books"]]
    for book in added:
        assert requests.delete(f"{url}/{book['id']}", timeout=10).status_code == 204
    assert_error(requests.delete(f"{url}/{added[0]['id']}", timeout=10), 404)
    gone = requests.post(gateway.url + "/api/books/search", json={"query": "有没有关于烹饪的书"}, timeout=120).json()
    assert gone == {"books": [], "message": "书籍不存在"}


def test_search_over_10000_titles(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path))
    titles = [f"{SEED_TITLES[i % 25]}（第{i}版）" for i in range(10000)]
    r = requests.post(gw.url + "/api/books", json={"titles": titles}, timeout=120)
    assert r.status_code == 201
    total = requests.get(gw.url + "/api/books", params={"limit": 1}, timeout=10).json()["total"]
    assert total == 10025
    r = requests.post(gw.url + "/api/books/search", json={"query": "我想学法语"}, timeout=120)
    assert r.status_code == 200, r.text
    books = r.json()["books"]
    assert len(books) <= 8
    assert all("法" in b["title"] for b in books)


def test_health_metrics_openapi(gateway):
    health = requests.get(gateway.url + "/health", timeout=10)
    assert health.status_code == 200
    # Anyone may ask; with no key they learn each component's state, never internal URLs or errors.
    body = health.json()
    assert body["status"] == "ok" and body["components"]["database"] == body["components"]["model_servers"] == "ok"
    assert body["components"]["search"] in ("ok", "loading")
    assert set(body["search"]) == {"ready", "books", "embedded", "pending_embeddings"}
    assert "detail" not in body and "127.0.0.1" not in health.text
    metrics = requests.get(gateway.url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "chatglm4_gateway_requests_total" in metrics.text
    page = requests.get(gateway.url + "/", timeout=10)
    assert page.status_code == 200 and "ChatGLM4 Web" in page.text


def test_openapi_is_built_from_the_routes_themselves(gateway):
    from conftest import ROOT

    spec = requests.get(gateway.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    declared = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = {(method, re.sub(r"<int:(\w+)>", r"{\1}", rule.rule)) for rule in gateway.app.url_map.iter_rules()
              if rule.endpoint != "static" for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert declared == served
    ops = spec["paths"]
    assert "201" in ops["/api/books"]["post"]["responses"]
    assert {"204", "404"} <= set(ops["/api/books/{book_id}"]["delete"]["responses"])
    assert ops["/health"]["get"]["responses"]["503"] == ops["/health"]["get"]["responses"]["200"] | {
        "description": "unavailable"}
    stream = ops["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert {"const": "[DONE]", "description": "the last event"} in stream["schema"]["properties"]["data"]["anyOf"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for _, path in declared:
        assert path.split("{")[0] in readme, path


# ---------------------------------------------------------------- every error status


JSON = "application/json"


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.fixture(scope="module")
def offline_gateway(tmp_path_factory):
    """A gateway app behind Flask's test client, with no model server: for answers that never need one."""
    from serveapi import create_app

    pool = StubPool()
    db = tmp_path_factory.mktemp("offline-gw") / "catalogue.db"
    app = create_app(gateway_config("http://127.0.0.1:9", f"sqlite:///{db}"), pool=pool)
    return app.test_client(), pool


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("POST", "/api/chat", {"data": "not json", "content_type": JSON}, 400),
    ("POST", "/api/chat", {"json": ["a", "list"]}, 400),
    ("POST", "/api/chat", {"data": b"", "content_type": JSON}, 400),
    ("POST", "/api/books/search", {"data": b"\xff\xfe{", "content_type": JSON}, 400),
    # nested past any parser's stack, or text that is no UTF-8: a 400, not a 500
    ("POST", "/api/books", {"data": "[" * 100_000 + "]" * 100_000, "content_type": JSON}, 400),
    ("POST", "/api/books", {"data": '{"a":' * 100_000 + "1" + "}" * 100_000, "content_type": JSON}, 400),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}],
                                               "metadata": nested(70)}}, 400),
    ("POST", "/api/books", {"data": '{"titles": ["a\\ud800b"]}', "content_type": JSON}, 400),
    ("POST", "/v1/chat/completions", {"data": '{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
                                      "content_type": JSON}, 400),
    # only application/json is read: a foreign page's form post cannot reach a keyless catalogue
    ("POST", "/api/books", {"data": '{"titles": ["x"]}', "content_type": "text/plain"}, 415),
    ("POST", "/api/books/search", {"data": "query=x", "content_type": "application/x-www-form-urlencoded"}, 415),
    ("POST", "/api/chat", {"data": '{"prompt": "hi"}'}, 415),
    ("GET", "/no/such/route", {}, 404),
    ("DELETE", "/api/books/abc", {}, 404),
    ("PUT", "/api/books", {"json": {}}, 405),
    ("GET", "/api/books/search", {}, 405),
    ("POST", "/api/books", {"data": b"x" * (3 * 1024 * 1024)}, 413),
    ("POST", "/api/chat", {"json": {"prompt": ""}}, 422),
    ("POST", "/api/chat", {"json": {"prompt": "hi", "history": [{"role": "robot", "content": "x"}]}}, 422),
    ("POST", "/api/chat", {"json": {"prompt": "hi", "temperature": -1}}, 422),
    ("POST", "/api/books/search", {"json": {"query": "   "}}, 422),
    ("POST", "/api/books/search", {"json": {"query": 42}}, 422),
    ("POST", "/api/books/search", {"json": {}}, 422),
    ("POST", "/api/books", {"json": {"titles": []}}, 422),
    ("POST", "/api/books", {"json": {"titles": ["x" * 256]}}, 422),
    ("GET", "/api/books", {"params": {"limit": "abc"}}, 422),
    ("GET", "/api/books", {"params": {"offset": "-1"}}, 422),
    ("GET", "/api/books", {"params": {"offset": "99999999999999999999"}}, 422),
    ("DELETE", "/api/books/99999999999999999999", {}, 404),
    ("PATCH", "/api/books/99999999999999999999", {"json": {"year": 1}}, 404),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}] * 10_000}}, 422),
    ("POST", "/api/chat", {"json": {"prompt": "x", "history": [{"role": "user", "content": "x"}] * 10_000}}, 422),
    ("POST", "/v1/chat/completions", {"json": {"messages": []}}, 422),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}], "top_p": 0}}, 422),
])
def test_bad_input_gets_its_status(offline_gateway, method, path, kwargs, status):
    client, pool = offline_gateway
    kwargs = dict(kwargs)
    if "params" in kwargs:
        kwargs["query_string"] = kwargs.pop("params")
    assert_error(client.open(path, method=method, **kwargs), status)
    assert pool.calls == []


def test_api_keys(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), api_keys="k1,k2")
    url = gw.url + "/api/books"
    assert_error(requests.get(url, timeout=10), 401)
    assert_error(requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10), 401)
    assert_error(requests.get(url, headers={"Authorization": "Basic k1"}, timeout=10), 401)
    assert requests.get(url, headers={"Authorization": "Bearer k2"}, timeout=10).status_code == 200
    # the page, health and the description stay public
    for path in ("/", "/health", "/openapi.json"):
        assert requests.get(gw.url + path, timeout=10).status_code == 200
    # ...but only a key holder sees what is behind /health: URLs, backends, reasons
    anonymous = requests.get(gw.url + "/health", headers={"Authorization": "Bearer nope"}, timeout=10).json()
    assert "detail" not in anonymous and anonymous["components"]["model_servers"] == "ok"
    detail = requests.get(gw.url + "/health", headers={"Authorization": "Bearer k1"}, timeout=10).json()["detail"]
    assert detail["database"]["backend"] == "sqlite" and model_server.url in detail["model_servers"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k1", max_retries=0, timeout=60)
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_rate_limit_is_a_429(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), rate_limit="3/minute")
    codes = [requests.get(gw.url + "/api/books", timeout=10).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200]
    r = requests.get(gw.url + "/api/books", timeout=10)
    assert_error(r, 429)
    assert r.headers["Retry-After"]
    assert requests.get(gw.url + "/health", timeout=10).status_code == 200  # not limited


def test_rate_limit_is_keyed_on_the_key_not_the_header(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), api_keys="k1,k2", rate_limit="3/minute")
    url = gw.url + "/api/books"
    # the same key written three ways is one bucket
    for header in ("Bearer k1", "Bearer  k1", "bearer k1 "):
        assert requests.get(url, headers={"Authorization": header}, timeout=10).status_code == 200
    assert_error(requests.get(url, headers={"Authorization": "Bearer   k1"}, timeout=10), 429)
    assert requests.get(url, headers={"Authorization": "Bearer k2"}, timeout=10).status_code == 200  # its own
    # made-up keys cannot mint fresh buckets: they count against the address (and are refused)
    codes = [requests.get(url, headers={"Authorization": f"Bearer made-up-{i}"}, timeout=10).status_code
             for i in range(4)]
    assert codes[:3] == [401, 401, 401] and codes[3] == 429


def test_rate_limit_without_keys_is_per_address(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), rate_limit="3/minute")
    codes = [requests.get(gw.url + "/api/books", headers={"Authorization": f"Bearer random-{i}"}, timeout=10
                          ).status_code for i in range(4)]
    assert codes == [200, 200, 200, 429]


def test_model_server_down_then_back(kernel, serve, tmp_path):
    from LLMapis import ServerState, create_app

    state = ServerState("SmolLM2-135M-Instruct")
    state.kernel = kernel
    port = free_port()
    # Stopped mid-test, so not started through `serve`, whose teardown would stop it a second time
    # (ServerThread.stop is not safe twice: it writes to its closed wake-up pipe's fd number).
    ms = ServerThread(create_app(state), port=port)
    try:
        gw = serve.gateway(ms.url, sqlite_url(tmp_path))
    finally:
        ms.stop()  # the model server goes away
    for path, body in (("/api/chat", {"prompt": "hi"}), ("/api/books/search", {"query": "我想学法语"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        started = time.monotonic()
        r = requests.post(gw.url + path, json=body, timeout=30)
        assert_error(r, 503)
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["code"] == "model_server_unavailable"
        assert time.monotonic() - started < 10
    assert_error(requests.get(gw.url + "/v1/models", timeout=30), 503)
    assert requests.get(gw.url + "/health", timeout=30).status_code == 503
    # the catalogue keeps working without a model
    assert requests.get(gw.url + "/api/books", timeout=10).status_code == 200
    serve(create_app(state), port=port, healthy=False)  # back on the same port
    wait_healthy(gw.url, timeout=30)
    r = requests.post(gw.url + "/api/chat", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def test_slow_model_server_is_a_503_within_the_timeout(model_server, serve, tmp_path):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), upstream_timeout=1.0)
    started = time.monotonic()
    r = requests.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 400, "ignore_eos": True})
    assert_error(r, 503)
    assert time.monotonic() - started < 5


def test_replicas_skip_a_dead_one(model_server, serve, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = serve.gateway(f"{dead},{model_server.url}", sqlite_url(tmp_path))
    for _ in range(3):
        r = requests.post(gw.url + "/api/chat", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200


# ---------------------------------------------------------------- injection


INJECTIONS = ["x'); DROP TABLE book; --", "' OR '1'='1", "\"; DELETE FROM book; --", "1; UPDATE book SET title='p'",
              "%' UNION SELECT id, title FROM book --"]


def test_sql_injection_through_every_string_field(gateway):
    def snapshot():
        return requests.get(gateway.url + "/api/books", params={"limit": 1000}, timeout=10).json()["books"]

    before = snapshot()
    for evil in INJECTIONS:
        assert requests.post(gateway.url + "/api/books/search", json={"query": evil}, timeout=120).status_code == 200
        assert requests.post(gateway.url + "/api/chat", json={"prompt": evil, "max_tokens": 2,
                                                              "history": [{"role": "user", "content": evil}]},
                             timeout=60).status_code == 200
        assert requests.get(gateway.url + "/api/books", params={"offset": evil}, timeout=10).status_code == 422
        assert requests.delete(gateway.url + "/api/books/" + requests.utils.quote(evil), timeout=10).status_code == 404
    assert snapshot() == before
    added = requests.post(gateway.url + "/api/books", json={"titles": INJECTIONS}, timeout=10).json()["books"]
    assert [b["title"] for b in added] == INJECTIONS  # stored literally
    after = snapshot()
    assert after[:len(before)] == before
    for book in added:
        requests.delete(f"{gateway.url}/api/books/{book['id']}", timeout=10)
    assert snapshot() == before


# ---------------------------------------------------------------- MySQL


def test_gateway_on_mysql(model_server, mysql_url, serve):
    gw = serve.gateway(model_server.url, mysql_url)
    health = requests.get(gw.url + "/health", timeout=10).json()
    assert health["components"]["database"] == "ok"
    page = requests.get(gw.url + "/api/books", params={"limit": 25}, timeout=10).json()
    assert [b["title"] for b in page["books"]] == SEED_TITLES and page["total"] == 25
    assert [b["id"] for b in page["books"]] == list(range(1, 26))
    r = requests.post(gw.url + "/api/books/search", json={"query": "帮我找找有关函数求导的书"}, timeout=120)
    assert r.status_code == 200
    assert all(SEED_TITLES[b["id"] - 1] == b["title"] for b in r.json()["books"])
    added = requests.post(gw.url + "/api/books", json={"titles": INJECTIONS}, timeout=10).json()["books"]
    assert [b["title"] for b in added] == INJECTIONS
    assert Catalogue(mysql_url).list(0, 100)[1] == 25 + len(INJECTIONS)
    assert requests.delete(f"{gw.url}/api/books/{added[0]['id']}", timeout=10).status_code == 204


def test_security_headers_and_options(offline_gateway):
    client, _ = offline_gateway
    page = client.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    for resp in (page, client.get("/api/books"), client.post("/api/books", data="x", content_type="text/plain")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    options = client.options("/api/books")
    assert options.status_code == 204 and not options.data
    assert {"GET", "POST"} <= {m.strip() for m in options.headers["Allow"].split(",")}
    assert client.options("/no/such/route").status_code == 404


def test_database_down_says_so_without_driver_text():
    from serveapi import create_app

    app = create_app(gateway_config("http://127.0.0.1:9", "mysql+pymysql://root:s3cretpw@127.0.0.1:1/x",
                                    embedding_models=""), pool=StubPool())
    client = app.test_client()
    try:
        r = client.get("/api/books")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json["error"]["code"] == "database_unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and health.json["components"]["database"] == "unavailable"
        for body in (r.get_data(as_text=True), health.get_data(as_text=True)):
            # no host, port, driver or password: those are in the log only
            assert not any(s in body for s in ("127.0.0.1", "pymysql", "s3cretpw", "Can't connect", "2003"))
    finally:
        app.extensions["chatglm4"]["index"].close()
