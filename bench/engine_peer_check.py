"""Issue 13's check against an engine not written here: the whole product (gateway, page, book
search, constrained JSON, tool calls) on `LLMapis.py --engine-url` in front of llama.cpp's
llama-server serving the embedded model. Part of `make bench` (building llama-server does not fit
`make test`'s time; bench/build_llama_server.sh builds it once).

    python bench/engine_peer_check.py

Prints a table of checks, each with what was seen (also written to bench/results-engine-peer.md);
exits 1 when one fails."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import llama_peer  # noqa: E402
from run import Proc, free_port  # noqa: E402
from soak import rss_mib  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def check_all(gateway: str, model_server: Proc, upstream: Proc) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn) -> None:
        try:
            ok, seen = fn()
        except Exception as exc:  # a check that raises is a failed check, reported with its error
            ok, seen = False, f"{type(exc).__name__}: {exc}"[:300]
        results.append((name, bool(ok), seen))
        print(f"  {'ok ' if ok else 'FAIL'} {name}: {seen}", flush=True)

    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=300)

    def chat():
        whole = client.chat.completions.create(model="m", messages=ask("Name three colours."), max_tokens=24,
                                               temperature=0)
        chunks = list(client.chat.completions.create(model="m", messages=ask("Name three colours."), max_tokens=24,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = whole.choices[0].message.content
        return (text and streamed == text and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens,
                f"{whole.usage.completion_tokens} tokens, streamed text {'equal' if streamed == text else 'differs'}: {text[:60]!r}")

    def json_schema():
        reply = client.chat.completions.create(model="m", messages=ask("Describe a person as JSON."), max_tokens=80,
                                               temperature=0, response_format={"type": "json_schema", "json_schema": {
                                                   "name": "person", "schema": PERSON, "strict": True}})
        person = json.loads(reply.choices[0].message.content)
        return set(person) == {"name", "age"} and isinstance(person["age"], int), json.dumps(person, ensure_ascii=False)

    def tool_call(stream: bool):
        def run():
            kwargs = dict(model="m", messages=ask("What is the weather in Paris?"), tools=[WEATHER],
                          tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64)
            if not stream:
                choice = client.chat.completions.create(**kwargs).choices[0]
                calls = choice.message.tool_calls or []
                args = json.loads(calls[0].function.arguments) if calls else {}
                return (choice.finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
                        and isinstance(args.get("city"), str), f"{choice.finish_reason}: {[(c.function.name, c.function.arguments) for c in calls]}")
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
            arguments = "".join(d.function.arguments or "" for d in deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return (deltas and deltas[0].function.name == "get_weather" and isinstance(json.loads(arguments).get("city"), str)
                    and finish == ["tool_calls"], f"{finish}: get_weather({arguments})")
        return run

    def book_search():
        r = requests.post(gateway + "/api/books/search", json={"query": "帮我找找有关函数求导的书"}, timeout=300)
        catalogue = {b["id"]: b["title"] for b in requests.get(gateway + "/api/books?limit=100", timeout=10).json()["books"]}
        books = r.json().get("books", [])
        return (r.status_code == 200 and all(catalogue.get(b["id"]) == b["title"] for b in books),
                f"{r.status_code}: {[b['title'] for b in books][:3]}")

    def page():
        """The page in Debian's Chromium: a chat message streams a reply; a book search lists books."""
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            try:
                page = browser.new_page()
                page.set_default_timeout(120_000)
                expect.set_options(timeout=120_000)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(gateway + "/")
                page.locator("#prompt").fill("Hello! What is the capital of France?")
                page.locator("#prompt").press("Enter")
                expect(page.locator('.msg.assistant[data-done="true"]')).to_have_count(1)
                reply = page.locator(".msg.assistant").first.inner_text().strip()
                page.locator('nav button[data-view="search"]').click()
                page.locator("#query").fill("帮我找找有关函数求导的书")
                page.locator("#searchbtn").click()
                expect(page.locator("#searchmsg")).to_have_text(re.compile(r"\d+ ms"))
                found = page.locator("#results li").first.inner_text().strip() if page.locator("#results li").count() \
                    else page.locator("#searchmsg").inner_text()
            finally:
                browser.close()
        return bool(reply) and bool(found) and not errors, f"chat reply {reply[:50]!r}; search shows {found[:40]!r}; page errors {errors}"

    def busy():
        """More requests than llama-server has slots: it queues them (it has no busy answer to map)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> int:
            body = {"messages": ask(f"Count to {i + 3}."), "max_tokens": 16}
            return requests.post(gateway + "/v1/chat/completions", json=body, timeout=300).status_code

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(one, range(12)))
        return codes == [200] * 12, f"12 requests over 4 slots: statuses {sorted(set(codes))}"

    def health():
        body = requests.get(model_server.url + "/health", timeout=10).json()
        return body.get("status") == "ok", json.dumps(body, ensure_ascii=False)[:200]

    def no_model():
        rss = rss_mib(model_server.p.pid)
        with open(f"/proc/{model_server.p.pid}/maps") as f:
            torch_mapped = "libtorch" in f.read()
        return rss < 300 and not torch_mapped, f"RSS {rss:.0f} MiB, libtorch {'mapped' if torch_mapped else 'not mapped'}"

    def killed_mid_stream():
        body = {"messages": ask("Tell a long story."), "max_tokens": 2000, "stream": True}
        with requests.post(gateway + "/v1/chat/completions", json=body, stream=True, timeout=120) as resp:
            lines = resp.iter_lines()
            next(l for l in lines if b'"content"' in l and b'"role"' not in l)
            upstream.p.kill()
            rest = [l for l in lines if l]
        error = json.loads(rest[-2][len(b"data: "):]) if len(rest) >= 2 else {}
        after = requests.post(gateway + "/v1/chat/completions", json={"messages": ask("hi")}, timeout=30)
        return (rest[-1:] == [b"data: [DONE]"] and "error" in error and after.status_code == 503,
                f"stream ended with {error.get('error', {}).get('message', rest[-1:])!r}; next request {after.status_code} "
                f"{after.json().get('error', {}).get('code')}")

    check("chat, whole and streamed (openai SDK through the gateway)", chat)
    check("response_format json_schema", json_schema)
    check("tool call, tool_choice required (`--engine-tool-calls schema`)", tool_call(False))
    check("tool call, streamed", tool_call(True))
    check("book search (gateway → model server → llama-server)", book_search)
    check("the page in Chromium: chat and book search", page)
    check("more requests than the engine's slots", busy)
    check("model server /health reports the upstream", health)
    check("the delegating model server holds no model", no_model)
    check("llama-server killed mid-stream", killed_mid_stream)
    return results


def measure() -> tuple[list[tuple[str, bool, str]], str]:
    try:
        server, _ = llama_peer.binaries()
    except (RuntimeError, OSError) as exc:
        return [], f"skipped: {exc}"
    port = free_port()
    # Tool calls need its Jinja chat templates; 4 slots of 4,096 tokens hold a book search prompt.
    argv = llama_peer.server_argv(server, llama_peer.model_file("int4", Path()), port, slots=4, slot_context=4096,
                                  extra=("--jinja",))
    upstream = Proc(argv, f"http://127.0.0.1:{port}", "bench-peer-llama.log")
    mport, gport = free_port(), free_port()
    # llama-server does not enforce tool_choice "required" for this model (its template has no tools:
    # it answered in prose), but it does enforce a JSON schema: forced calls travel as one.
    ms = Proc([sys.executable, "LLMapis.py", "--port", str(mport), "--engine-url", upstream.url + "/v1",
               "--engine-tool-calls", "schema"],
              f"http://127.0.0.1:{mport}", "bench-peer-model-server.log")
    db = Path(tempfile.mkdtemp()) / "catalogue.db"
    gw = Proc([sys.executable, "serveapi.py", "--port", str(gport), "--model-server", ms.url,
               "--database-url", f"sqlite:///{db}"], f"http://127.0.0.1:{gport}", "bench-peer-gateway.log")
    try:
        upstream.wait(timeout=300)
        ms.wait(timeout=120)
        gw.wait(timeout=600)
        return check_all(gw.url, ms, upstream), ""
    finally:
        for p in (gw, ms, upstream):
            p.stop()


def markdown(results: list[tuple[str, bool, str]], note: str) -> str:
    head = ("Our product on an engine not written here (`bench/engine_peer_check.py`): gateway → "
            "`LLMapis.py --engine-url` → llama.cpp's llama-server (`--jinja`) serving the embedded Q4_1 file.")
    if note:
        return head + f" {note}\n"
    lines = [head, "", "| check | passed | seen |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'yes' if ok else 'no'} | {seen.replace('|', '/')} |" for name, ok, seen in results]
    return "\n".join(lines) + "\n"


def main() -> int:
    results, note = measure()
    text = markdown(results, note)
    (HERE / "results-engine-peer.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if results and all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
