"""The web page end to end: headless Chromium (Playwright, sync API) against the real gateway and the
real model server on loopback. Chat streaming and stop, book search, the catalogue, the model server
going away, API keys, untrusted model output, and a phone-width layout. Screenshots of each view go
to test-output/screenshots/."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from chatglm4.catalogue import load_seed_titles
from conftest import ServerThread, free_port, wait_healthy

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SEED_TITLES = load_seed_titles()
REPLY = ".msg.assistant"
CHAT = "/v1/chat/completions"  # what the page streams from
DONE_REPLY = '.msg.assistant[data-done="true"]'

expect.set_options(timeout=30_000)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    """Opens pages in fresh contexts (own localStorage); fails the test on any uncaught page error,
    and on any request that leaves the page's origin (the page vendors its libraries: no CDN)."""
    contexts, errors, foreign = [], [], []

    def open_page(url: str, **context_options):
        context = browser.new_context(**context_options)
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        origin = re.match(r"https?://[^/]+", url).group(0)
        page.on("request", lambda r: None if r.url.startswith((origin + "/", "data:", "blob:"))
                else foreign.append(r.url))
        # The page runs under a strict Content-Security-Policy: anything it blocks is a defect.
        page.on("console", lambda msg: errors.append(msg.text)
                if msg.type == "error" and "Content Security Policy" in msg.text else None)
        page.goto(url)
        expect(page.locator("#send")).to_be_visible()
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
    assert not foreign, f"requests that left the page's origin: {foreign}"


@pytest.fixture(scope="module")
def shots(output_dir) -> Path:
    folder = output_dir / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sqlite_url(tmp_path) -> str:
    """A SQLite catalogue of the test's own."""
    return f"sqlite:///{tmp_path}/catalogue.db"


def tab(page, name: str) -> None:
    page.locator(f'nav button[data-view="{name}"]').click()
    expect(page.locator(f"#view-{name}")).to_be_visible()


def send(page, text: str, *, enter: bool = True) -> None:
    page.locator("#prompt").fill(text)
    if enter:
        page.locator("#prompt").press("Enter")
    else:
        page.locator("#send").click()


def assert_human(text: str) -> None:
    """An error shown to a person: a sentence, not a JSON body."""
    assert text.strip(), "no error message shown"
    assert '{"error"' not in text and "{'error'" not in text and not text.lstrip().startswith("{"), text


# ---------------------------------------------------------------- chat


def test_chat_streams_replies_and_new_conversation(gateway, new_page, shots):
    page = new_page(gateway.url)
    expect(page.locator("#keybox")).to_be_hidden()  # no API_KEYS on this gateway
    expect(page.locator("#stop")).to_be_disabled()

    send(page, "Hello! What is the capital of France?", enter=True)
    expect(page.locator(".msg.user")).to_have_text("Hello! What is the capital of France?")
    expect(page.locator(DONE_REPLY)).to_have_count(1)
    first = page.locator(REPLY).first.inner_text().strip()
    assert first and first != "…" and "[stopped]" not in first
    expect(page.locator("#chaterror")).to_have_text("")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#prompt")).to_have_value("")

    # the real server's usage chunk gives the answer's token count, speed and time to first token
    expect(page.locator(".msgbar.for-assistant .stats").first).to_contain_text("TTFT")
    expect(page.locator(".msgbar.for-assistant .stats").first).to_contain_text("tokens")
    assert "≈" not in page.locator(".msgbar.for-assistant .stats").first.inner_text()

    # a second turn with the send button; the conversation so far goes along
    requests_seen: list[dict] = []
    page.on("request", lambda r: requests_seen.append(r.post_data_json) if r.url.endswith(CHAT) else None)
    send(page, "And of Italy?", enter=False)
    expect(page.locator(DONE_REPLY)).to_have_count(2)
    assert page.locator(REPLY).nth(1).inner_text().strip()
    assert requests_seen and requests_seen[-1]["stream"] is True
    assert requests_seen[-1]["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in requests_seen[-1]["messages"]] == ["user", "assistant", "user"]
    assert requests_seen[-1]["messages"][1]["content"].strip()
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # Shift+Enter is a new line, not a send
    page.locator("#prompt").fill("line one")
    page.locator("#prompt").press("Shift+Enter")
    page.locator("#prompt").type("line two")
    expect(page.locator("#prompt")).to_have_value("line one\nline two")
    expect(page.locator(".msg.user")).to_have_count(2)

    # a new conversation empties the log and the history
    page.locator("#newchat").click()
    expect(page.locator(".msg")).to_have_count(0)
    page.locator("#prompt").fill("Hi")
    with page.expect_request("**" + CHAT) as req:
        page.locator("#prompt").press("Enter")
    assert req.value.post_data_json["messages"] == [{"role": "user", "content": "Hi"}]
    expect(page.locator(DONE_REPLY)).to_have_count(1)


def test_stop_a_long_reply(kernel, tmp_path, serve, new_page, shots):
    from LLMkernel import Kernel

    # The page sends no max_tokens: a model server whose default is large makes the reply long. It is
    # the test's own, over the session's engine (the model is loaded once).
    long_replies = Kernel(kernel.engine, default_max_tokens=1500, default_temperature=kernel.default_temperature,
                          candidate_limit=kernel.candidate_limit)
    ms = serve.model_server(long_replies)
    gw = serve.gateway(ms.url, sqlite_url(tmp_path))
    page = new_page(gw.url)
    send(page, "Write a very long story about a dragon who learns to bake bread. "
               "Make it at least two thousand words, with many chapters.")
    bubble = page.locator(REPLY).last
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#send")).to_be_disabled()
    # the first token has arrived: the placeholder is gone
    page.wait_for_function("() => { const b = document.querySelector('.msg.assistant.streaming');"
                           " return b && b.textContent.trim() && b.textContent !== '…'; }")
    page.locator("#stop").click()
    expect(bubble).to_have_attribute("data-done", "true")
    expect(bubble).to_contain_text("[stopped]")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#chaterror")).to_have_text("")
    page.screenshot(path=str(shots / "chat-stopped.png"))
    # stopping frees the model: the generation is cancelled, not left running to 1500 tokens
    deadline = time.monotonic() + 15
    while True:
        detail = requests.get(ms.url + "/health", timeout=5).json()["detail"]
        if detail["running"] == 0 and detail["waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"generation still running after stop: {detail}"
        time.sleep(0.2)
    # the conversation goes on after a stop
    with page.expect_request("**" + CHAT) as req:
        send(page, "Thanks.")
    history = req.value.post_data_json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"] and "dragon" in history[0]["content"]
    page.locator("#stop").click()
    expect(page.locator(DONE_REPLY)).to_have_count(2)


# ---------------------------------------------------------------- book search


def test_search_the_seed_catalogue(gateway, new_page, shots):
    page = new_page(gateway.url)
    # styles come from static/app.css (the policy forbids inline ones) and are applied
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    tab(page, "search")
    page.locator("#query").fill("我想学法语")
    page.locator("#query").press("Enter")
    expect(page.locator("#searchmsg")).to_have_text(re.compile(r"\d+ ms"))
    items = page.locator("#results li")
    assert items.count() >= 1, page.locator("#searchmsg").inner_text()
    for i in range(items.count()):
        book_id = int(items.nth(i).locator(".id").inner_text().lstrip("#"))
        title = items.nth(i).locator(".title").inner_text()
        assert title in SEED_TITLES and SEED_TITLES[book_id - 1] == title, (book_id, title)
        assert "法" in title
    expect(page.locator("#searcherror")).to_have_text("")
    page.screenshot(path=str(shots / "search.png"), full_page=True)

    page.locator("#query").fill("有没有关于烹饪的书")
    page.locator("#searchbtn").click()
    expect(page.locator("#searchmsg")).to_contain_text("书籍不存在")
    expect(page.locator("#searchmsg")).to_have_text(re.compile(r"\d+ ms"))
    expect(page.locator("#results li")).to_have_count(0)


# ---------------------------------------------------------------- catalogue


def test_catalogue_add_find_page_delete(gateway, new_page, shots):
    page = new_page(gateway.url)
    tab(page, "catalogue")
    expect(page.locator("#catlist li").first).to_contain_text("#1")
    total_before = requests.get(gateway.url + "/api/books", params={"limit": 1}, timeout=10).json()["total"]
    expect(page.locator("#cattotal")).to_contain_text(str(total_before))

    title = f"页面测试 <b>not bold</b> {uuid.uuid4().hex[:8]}"
    page.locator("#newtitles").fill(title + "\n\n")
    page.locator("#newauthor").fill("  测试作者 <i>A</i> ")
    page.locator("#newsubjects").fill("测试; 页面；测试")
    with page.expect_request("**/api/books") as req:
        page.locator("#addbtn").click()
    assert req.value.post_data_json == {"books": [{"title": title, "author": "测试作者 <i>A</i>",
                                                   "subjects": ["测试", "页面"]}]}
    # the added book is shown at once (the page turns to where it landed), as text
    row = page.locator("#catlist li", has_text=title)
    expect(row).to_be_visible()
    expect(row.locator(".author")).to_have_text("测试作者 <i>A</i>")
    expect(row.locator(".subjects .subject")).to_have_text(["测试", "页面"])
    expect(row.locator(".year")).to_have_count(0)
    expect(page.locator("#catlist b, #catlist i")).to_have_count(0)
    for field in ("#newauthor", "#newsubjects", "#newyear"):
        expect(page.locator(field)).to_have_value("")
    expect(page.locator("#cattotal")).to_contain_text(str(total_before + 1))
    expect(page.locator("#newtitles")).to_have_value("")
    book_id = int(row.locator(".id").inner_text().lstrip("#"))
    page.screenshot(path=str(shots / "catalogue.png"), full_page=True)

    # paging back to the first page and forward again finds it in the list
    pages = -(-(total_before + 1) // 20)
    expect(page.locator("#pageinfo")).to_have_text(f"{pages} / {pages}")
    if pages > 1:
        page.locator("#prev").click()
        expect(page.locator("#pageinfo")).to_have_text(f"{pages - 1} / {pages}")
        expect(row).to_have_count(0)
        page.locator("#next").click()
        expect(row).to_be_visible()
    expect(page.locator("#next")).to_be_disabled()

    row.get_by_role("button", name=f"Delete #{book_id}").click()
    expect(page.locator("#catlist li", has_text=title)).to_have_count(0)
    expect(page.locator("#cattotal")).to_contain_text(str(total_before))
    assert requests.delete(f"{gateway.url}/api/books/{book_id}", timeout=10).status_code == 404
    expect(page.locator("#caterror")).to_have_text("")


# ---------------------------------------------------------------- rich records: author, subjects, import, edit


def add_books(url: str, *books: dict) -> list[dict]:
    r = requests.post(url + "/api/books", json={"books": list(books)}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["books"]


def all_books(url: str) -> list[dict]:
    books, offset = [], 0
    while True:
        page = requests.get(url + "/api/books", params={"offset": offset, "limit": 100}, timeout=10).json()
        books += page["books"]
        offset += 100
        if offset >= page["total"]:
            return books


def test_search_result_shows_author_and_subjects(model_server, tmp_path, serve, new_page, shots):
    # Retrieval's candidates are the answer here (no model choice), so the book looked for is shown.
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), search_model_choice="off")
    title = "观鸟图鉴：中国鸟类野外手册"
    [book] = add_books(gw.url, {"title": title, "author": "约翰·马敬能", "subjects": ["鸟类", "自然", "野外观察"],
                                "year": 2000})
    page = new_page(gw.url)
    tab(page, "search")
    page.locator("#query").fill("观鸟图鉴 中国鸟类野外手册")
    page.locator("#query").press("Enter")
    expect(page.locator("#searchmsg")).to_have_text(re.compile(r"\d+ ms"))
    row = page.locator(f'#results li[data-id="{book["id"]}"]')
    expect(row).to_be_visible()
    expect(row.locator(".id")).to_have_text(f"#{book['id']}")
    expect(row.locator(".title")).to_have_text(title)
    expect(row.locator(".author")).to_have_text("约翰·马敬能")
    expect(row.locator(".year")).to_have_text("2000")
    expect(row.locator(".subjects .subject")).to_have_text(["鸟类", "自然", "野外观察"])
    # search results are read-only
    expect(page.locator("#results button")).to_have_count(0)
    # a seed book without author or subjects shows no empty meta line
    for i in range(page.locator("#results li").count()):
        item = page.locator("#results li").nth(i)
        if item.get_attribute("data-id") != str(book["id"]):
            expect(item.locator(".meta")).to_have_count(0)
    page.screenshot(path=str(shots / "search-rich.png"), full_page=True)


def test_import_a_file_in_the_page(model_server, tmp_path, serve, new_page, shots):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path))
    page = new_page(gw.url)
    tab(page, "catalogue")
    expect(page.locator("#cattotal")).to_contain_text("25")
    seed = SEED_TITLES[0]
    good = ("title,author,subjects,year,isbn,description\n"
            '"导入测试：线性代数, 第二版",Gilbert Strang,数学;线性代数,2016,9787302,一本教材\n'
            "导入测试：拓扑学,,数学,,,\n"
            f"{seed},,,,,\n").encode("utf-8")
    with page.expect_request("**/api/books/import") as req:
        page.locator("#importfile").set_input_files(files=[{"name": "books.csv", "mimeType": "text/csv",
                                                             "buffer": good}])
    assert req.value.headers["content-type"] == "text/csv"
    expect(page.locator("#importmsg")).to_contain_text("新增 2 本，已有 1 本")
    expect(page.locator("#importerror")).to_have_text("")
    by_title = {b["title"]: b for b in all_books(gw.url)}
    assert len(by_title) == 27
    linear = by_title["导入测试：线性代数, 第二版"]
    assert linear["author"] == "Gilbert Strang" and linear["subjects"] == ["数学", "线性代数"] and linear["year"] == 2016
    assert by_title["导入测试：拓扑学"]["subjects"] == ["数学"]
    # the list is reloaded: the imported books are on the last page, with their author and subjects
    expect(page.locator("#cattotal")).to_contain_text("27")
    row = page.locator(f'#catlist li[data-id="{linear["id"]}"]')
    expect(row.locator(".author")).to_have_text("Gilbert Strang")
    expect(row.locator(".subjects .subject")).to_have_text(["数学", "线性代数"])
    expect(page.locator("#importfile")).to_be_enabled()
    page.screenshot(path=str(shots / "catalogue-imported.png"), full_page=True)

    # a malformed file: the line is named, nothing is imported, and the earlier message is gone
    bad = ("title,author,subjects,year\n"
           "导入测试：不应出现,Someone,数学,1999\n"
           "导入测试：年份错误,Someone,数学,nineteen\n").encode("utf-8")
    page.locator("#importfile").set_input_files(files=[{"name": "bad.csv", "mimeType": "text/csv", "buffer": bad}])
    error = page.locator("#importerror")
    expect(error).to_contain_text("line 3")
    assert_human(error.inner_text())
    assert "nothing was imported" in error.inner_text()
    expect(page.locator("#importmsg")).to_have_text("")
    titles = {b["title"] for b in all_books(gw.url)}
    assert len(titles) == 27 and "导入测试：不应出现" not in titles
    expect(page.locator("#cattotal")).to_contain_text("27")

    # JSON lines go as application/x-ndjson
    jsonl = json.dumps({"title": "导入测试：概率论", "subjects": "数学;概率"}, ensure_ascii=False).encode("utf-8")
    with page.expect_request("**/api/books/import") as req:
        page.locator("#importfile").set_input_files(files=[{"name": "more.jsonl", "mimeType": "",
                                                             "buffer": jsonl}])
    assert req.value.headers["content-type"] == "application/x-ndjson"
    expect(page.locator("#importmsg")).to_contain_text("新增 1 本，已有 0 本")
    expect(error).to_have_text("")
    assert any(b["title"] == "导入测试：概率论" and b["subjects"] == ["数学", "概率"] for b in all_books(gw.url))

    # a file of another kind is refused in the page, before any upload
    seen = []
    page.on("request", lambda r: seen.append(r.url) if r.url.endswith("/api/books/import") else None)
    page.locator("#importfile").set_input_files(files=[{"name": "books.xlsx", "mimeType": "application/vnd.ms-excel",
                                                         "buffer": b"PK\x03\x04"}])
    expect(error).to_contain_text(".csv")
    assert not seen


def test_edit_a_book_in_the_page(model_server, tmp_path, serve, new_page, shots, output_dir):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path))
    page = new_page(gw.url)
    tab(page, "catalogue")
    row = page.locator('#catlist li[data-id="1"]')
    expect(row.locator(".title")).to_have_text(SEED_TITLES[0])
    expect(row.locator(".meta")).to_have_count(0)

    # the form opens prefilled; Cancel puts the row back as it was
    row.get_by_role("button", name="Edit #1").click()
    form = row.locator("form.edit")
    expect(form.locator('input[name="title"]')).to_have_value(SEED_TITLES[0])
    expect(form.locator('input[name="title"]')).to_be_focused()
    expect(form.locator('input[name="author"]')).to_have_value("")
    form.locator('input[name="author"]').fill("改了又取消")
    form.get_by_role("button", name="取消 Cancel").click()
    expect(row.locator("form")).to_have_count(0)
    expect(row.locator(".title")).to_have_text(SEED_TITLES[0])
    expect(row.get_by_role("button", name="Edit #1")).to_be_focused()

    # Save sends only what changed, and the row shows the result
    row.get_by_role("button", name="Edit #1").click()
    form.locator('input[name="author"]').fill("  王老师 ")
    form.locator('input[name="subjects"]').fill("语言；法语; 入门 ;")
    form.locator('input[name="year"]').fill("2019")
    with page.expect_request(lambda r: r.method == "PATCH") as req:
        form.get_by_role("button", name="保存 Save").click()
    assert req.value.url.endswith("/api/books/1")
    assert req.value.post_data_json == {"author": "王老师", "subjects": ["语言", "法语", "入门"], "year": 2019}
    expect(row.locator("form")).to_have_count(0)
    expect(row.locator(".author")).to_have_text("王老师")
    expect(row.locator(".year")).to_have_text("2019")
    expect(row.locator(".subjects .subject")).to_have_text(["语言", "法语", "入门"])
    expect(page.locator("#catmsg")).to_contain_text("#1")
    stored = requests.get(gw.url + "/api/books", params={"offset": 0, "limit": 1}, timeout=10).json()["books"][0]
    assert stored == {**stored, "id": 1, "title": SEED_TITLES[0], "author": "王老师",
                      "subjects": ["语言", "法语", "入门"], "year": 2019}

    # clearing a field sends null; a year that is not a number is caught in the page
    row.get_by_role("button", name="Edit #1").click()
    form.locator('input[name="year"]').fill("MMXIX")
    form.get_by_role("button", name="保存 Save").click()
    expect(form.locator(".editerror")).to_contain_text("year")
    form.locator('input[name="year"]').fill("")
    with page.expect_request(lambda r: r.method == "PATCH") as req:
        form.locator('input[name="year"]').press("Enter")
    assert req.value.post_data_json == {"year": None}
    expect(row.locator(".year")).to_have_count(0)
    expect(row.locator(".author")).to_have_text("王老师")

    # a title another book has: a 409 shown in the form, which stays open with what was typed
    row.get_by_role("button", name="Edit #1").click()
    form.locator('input[name="title"]').fill(SEED_TITLES[1])
    form.locator('input[name="author"]').fill("另一位作者")
    form.get_by_role("button", name="保存 Save").click()
    error = form.locator(".editerror")
    expect(error).to_contain_text("409")
    assert_human(error.inner_text())
    assert SEED_TITLES[1] in error.inner_text()
    expect(form.locator('input[name="title"]')).to_have_value(SEED_TITLES[1])
    expect(form.get_by_role("button", name="保存 Save")).to_be_enabled()
    page.screenshot(path=str(output_dir / "page-catalogue.png"), full_page=True)
    stored = requests.get(gw.url + "/api/books", params={"offset": 0, "limit": 1}, timeout=10).json()["books"][0]
    assert stored["title"] == SEED_TITLES[0] and stored["author"] == "王老师"
    # Escape cancels: the row is as stored
    form.locator('input[name="author"]').press("Escape")
    expect(row.locator("form")).to_have_count(0)
    expect(row.locator(".title")).to_have_text(SEED_TITLES[0])
    expect(row.locator(".author")).to_have_text("王老师")

    # a book deleted meanwhile: 404 in the form
    [extra] = add_books(gw.url, {"title": "编辑测试：将被删除"})
    page.locator("#next").click()
    gone = page.locator(f'#catlist li[data-id="{extra["id"]}"]')
    gone.get_by_role("button", name=f"Edit #{extra['id']}").click()
    assert requests.delete(f"{gw.url}/api/books/{extra['id']}", timeout=10).status_code == 204
    gone.locator('input[name="author"]').fill("无人")
    gone.get_by_role("button", name="保存 Save").click()
    expect(gone.locator(".editerror")).to_contain_text("404")
    expect(page.locator("#caterror")).to_have_text("")


# ---------------------------------------------------------------- failures shown as sentences


def test_model_server_down_is_a_human_message(kernel, tmp_path, serve, new_page, shots):
    from LLMapis import ServerState, create_app

    port = free_port()
    state = ServerState("SmolLM2-135M-Instruct")
    state.kernel = kernel
    # Stopped mid-test, so not started through `serve`, whose teardown would stop it a second time
    # (ServerThread.stop is not safe twice: it writes to its closed wake-up pipe's fd number).
    ms = ServerThread(create_app(state), port=port)
    try:
        gw = serve.gateway(ms.url, sqlite_url(tmp_path))
        page = new_page(gw.url)
    finally:
        ms.stop()  # the model server goes away

    send(page, "Hello?")
    error = page.locator("#chaterror")
    expect(error).not_to_have_text("")
    assert_human(error.inner_text())
    assert "503" in error.inner_text() or "unavailable" in error.inner_text().lower()
    expect(page.locator(REPLY)).to_have_count(0)  # no empty bubble left behind
    expect(page.locator("#send")).to_be_enabled()
    page.screenshot(path=str(shots / "error.png"), full_page=True)

    tab(page, "search")
    page.locator("#query").fill("我想学法语")
    page.locator("#query").press("Enter")
    expect(page.locator("#searcherror")).not_to_have_text("")
    assert_human(page.locator("#searcherror").inner_text())
    expect(page.locator("#searchbtn")).to_be_enabled()

    # the catalogue needs no model
    tab(page, "catalogue")
    expect(page.locator("#catlist li")).to_have_count(20)
    expect(page.locator("#cattotal")).to_contain_text("25")
    expect(page.locator("#caterror")).to_have_text("")

    # the model server comes back: the same page chats again, and the old error is gone
    serve.model_server(kernel, port=port)
    wait_healthy(gw.url, timeout=30)
    tab(page, "chat")
    send(page, "Hello again")
    expect(page.locator(DONE_REPLY)).to_have_count(1)
    expect(page.locator("#chaterror")).to_have_text("")


def test_api_key_box(model_server, tmp_path, serve, new_page, shots):
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), api_keys="k1,k2")
    page = new_page(gw.url)
    expect(page.locator("#keybox")).to_be_visible()

    send(page, "hi")
    error = page.locator("#chaterror")
    expect(error).to_contain_text("401")
    assert_human(error.inner_text())
    assert "key" in error.inner_text().lower()

    tab(page, "catalogue")
    expect(page.locator("#caterror")).to_contain_text("401")
    expect(page.locator("#catlist li")).to_have_count(0)

    page.locator("#apikey").fill("k2")
    page.locator("#savekey").click()
    expect(page.locator("#catlist li")).to_have_count(20)
    expect(page.locator("#caterror")).to_have_text("")
    assert page.evaluate("localStorage.getItem('chatglm4.apikey')") == "k2"
    expect(page.locator("#apikey")).to_have_value("")  # the key is not left on display
    page.screenshot(path=str(shots / "apikey.png"))

    # the key survives a reload; a wrong one is a 401 message again
    page.reload()
    tab(page, "catalogue")
    expect(page.locator("#catlist li")).to_have_count(20)
    page.locator("#apikey").fill("wrong")
    page.locator("#apikey").press("Enter")
    expect(page.locator("#caterror")).to_contain_text("401")


def canned_sse(*pieces: str, tail: list[dict] | None = None) -> str:
    frames = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    frames += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    frames += tail if tail is not None else [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"


def test_model_output_renders_as_text(gateway, new_page, shots):
    page = new_page(gateway.url)
    # What is under test is the page's rendering of whatever the model says, so the reply is canned.
    body = canned_sse("Look: <img src=x onerr", "or=\"window.__pwned=1\"> and <script>window.__pwned=2</script> ",
                      # A fence opens a line (CommonMark); the old page's splitter also took mid-line ones.
                      "\n```html\n<b>bold</b>\n<img src=y onerror=\"window.__pwned=3\">\n```\n",
                      " inline `<i>x</i>` and a lone ` backtick")
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, 'my own <img src=z onerror="window.__pwned=4">')
    bubble = page.locator(DONE_REPLY)
    expect(bubble).to_have_count(1)
    log = page.locator("#log")
    for tag in ("img", "script", "b", "i"):
        expect(log.locator(tag)).to_have_count(0)
    assert page.evaluate("window.__pwned") is None
    text = bubble.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text and "<script>window.__pwned=2</script>" in text
    expect(bubble.locator("pre")).to_have_count(1)
    expect(bubble.locator("pre")).to_have_text('<b>bold</b>\n<img src=y onerror="window.__pwned=3">\n')
    expect(bubble.locator(":not(pre) > code")).to_have_text("<i>x</i>")
    assert "a lone ` backtick" in text
    expect(page.locator(".msg.user")).to_have_text('my own <img src=z onerror="window.__pwned=4">')
    page.screenshot(path=str(shots / "untrusted-output.png"))

    # a failure after the stream started, and a 429, are sentences too
    page.unroute("**" + CHAT)
    broken = canned_sse("Half a rep", tail=[{"error": {"message": "the model server stopped answering",
                                                        "type": "service_unavailable"}}])
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=broken))
    send(page, "go on")
    expect(page.locator(DONE_REPLY)).to_have_count(2)
    expect(page.locator(REPLY).last).to_contain_text("Half a rep")
    expect(page.locator("#chaterror")).not_to_have_text("")
    assert_human(page.locator("#chaterror").inner_text())

    page.unroute("**" + CHAT)
    page.route("**" + CHAT, lambda route: route.fulfill(
        status=429, content_type="application/json", headers={"Retry-After": "7"},
        body=json.dumps({"error": {"message": "rate limit exceeded: 3 per 1 minute", "type": "rate_limited"}})))
    send(page, "again")
    expect(page.locator("#chaterror")).to_contain_text("429")
    assert_human(page.locator("#chaterror").inner_text())


def test_phone_width(gateway, new_page, shots):
    page = new_page(gateway.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    long_line = "x" * 300
    body = canned_sse(f"A long unbroken word {long_line} and code:\n```\n{long_line}\n```")
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, "https://example.com/" + "a" * 200, enter=False)
    expect(page.locator(DONE_REPLY)).to_have_count(1)

    def assert_fits(view: str) -> None:
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, f"{view}: horizontal scroll, content is {width}px wide"

    assert_fits("chat")
    # the conversation list folds behind a button at this width
    expect(page.locator("#convpane")).to_be_hidden()
    page.locator("#convtoggle").click()
    expect(page.locator("#convlist button.conv")).to_have_count(1)
    assert_fits("chat, conversations open")
    page.screenshot(path=str(shots / "phone-conversations.png"))
    page.locator("#convlist button.conv").click()
    expect(page.locator("#convpane")).to_be_hidden()
    boxes = []
    for button in ("#send", "#stop", "#newchat"):
        expect(page.locator(button)).to_be_in_viewport()
        box = page.locator(button).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (button, box)
        boxes.append(box)
    assert len({round(b["height"]) for b in boxes}) == 1, f"a button label wraps: {boxes}"
    page.screenshot(path=str(shots / "phone-chat.png"))
    tab(page, "search")
    assert_fits("search")
    tab(page, "catalogue")
    expect(page.locator("#catlist li").first).to_be_visible()
    assert_fits("catalogue")
    page.screenshot(path=str(shots / "phone-catalogue.png"), full_page=True)
    row = page.locator('#catlist li[data-id="1"]')
    row.get_by_role("button", name="Edit #1").click()
    expect(row.locator("form.edit")).to_be_visible()
    assert_fits("catalogue, editing")
    for button in ("保存 Save", "取消 Cancel"):
        box = row.get_by_role("button", name=button).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (button, box)
    page.screenshot(path=str(shots / "phone-catalogue-edit.png"))
    row.get_by_role("button", name="取消 Cancel").click()
    expect(row.locator("form")).to_have_count(0)


# ---------------------------------------------------------------- conversations, rendering (issue 14)


def canned_chat(page) -> list[dict]:
    """Answers every chat request of `page` with a canned stream (the real rendering, no model):
    "answer to: <last message>", then a usage chunk. Returns the request bodies seen."""
    seen: list[dict] = []

    def handle(route):
        body = route.request.post_data_json
        seen.append(body)
        usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}
        route.fulfill(status=200, content_type="text/event-stream",
                      body=canned_sse("answer to: ", body["messages"][-1]["content"],
                                      tail=[{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, usage]))

    page.route("**" + CHAT, handle)
    return seen


def user_texts(page) -> list[str]:
    return page.locator(".msg.user").all_inner_texts()


def test_conversations_kept_switched_and_exported(gateway, new_page, shots, tmp_path):
    page = new_page(gateway.url)
    seen = canned_chat(page)
    send(page, "第一个问题 about apples")
    expect(page.locator(DONE_REPLY)).to_have_text(["answer to: 第一个问题 about apples"])
    expect(page.locator(".msgbar.for-assistant .stats")).to_contain_text("TTFT")
    expect(page.locator(".msgbar.for-assistant .stats")).to_contain_text("5 tokens")  # from the usage chunk

    # settings belong to the conversation and go with its requests
    page.locator("#settings summary").click()
    page.locator("#sys").fill("Be brief.")
    page.locator("#temperature").fill("0.2")
    page.locator("#max_tokens").fill("64")
    page.locator("#max_tokens").press("Tab")
    send(page, "second in A")
    expect(page.locator(DONE_REPLY)).to_have_count(2)
    assert seen[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "第一个问题 about apples"},
                                    {"role": "assistant", "content": "answer to: 第一个问题 about apples"},
                                    {"role": "user", "content": "second in A"}]
    assert seen[-1]["temperature"] == 0.2 and seen[-1]["max_tokens"] == 64 and "top_p" not in seen[-1]

    # a second conversation starts empty, with default settings
    page.locator("#newchat").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#sys")).to_have_value("")
    send(page, "B question")
    expect(page.locator(DONE_REPLY)).to_have_count(1)
    assert seen[-1]["messages"] == [{"role": "user", "content": "B question"}] and "temperature" not in seen[-1]
    expect(page.locator("#convlist button.conv")).to_have_text(["B question", "第一个问题 about apples"])

    # a reload keeps both, and shows the one that was open
    page.reload()
    expect(page.locator(DONE_REPLY)).to_have_count(1)
    assert user_texts(page) == ["B question"]
    expect(page.locator("#convlist button.conv")).to_have_count(2)

    # switching brings back the other one's messages and settings
    page.locator("#convlist button.conv", has_text="第一个问题").click()
    expect(page.locator(DONE_REPLY)).to_have_count(2)
    assert user_texts(page) == ["第一个问题 about apples", "second in A"]
    expect(page.locator("#sys")).to_have_value("Be brief.")
    expect(page.locator("#temperature")).to_have_value("0.2")
    expect(page.locator('#convlist button.conv[aria-current="true"]')).to_have_text("第一个问题 about apples")

    # rename
    page.locator("#convtitle").fill("苹果 Apples")
    page.locator("#convtitle").press("Enter")
    expect(page.locator('#convlist button.conv[aria-current="true"]')).to_have_text("苹果 Apples")

    # regenerate the last answer: the same conversation is asked again
    with page.expect_request("**" + CHAT) as req:
        page.locator(".regen").click()
    assert req.value.post_data_json["messages"][-1] == {"role": "user", "content": "second in A"}
    expect(page.locator(DONE_REPLY)).to_have_count(2)

    # edit the first message and resend: what came after it is gone
    page.get_by_role("button", name="Edit message 1").click()
    page.locator("form.msgedit textarea").fill("edited first")
    with page.expect_request("**" + CHAT) as req:
        page.get_by_role("button", name="保存并重发 Save & resend").click()
    assert req.value.post_data_json["messages"] == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "edited first"}]
    expect(page.locator(DONE_REPLY)).to_have_text(["answer to: edited first"])
    assert user_texts(page) == ["edited first"]
    page.screenshot(path=str(shots / "conversations.png"), full_page=True)

    # export as JSON and as Markdown
    with page.expect_download() as dl:
        page.locator("#exportjson").click()
    exported = json.loads(Path(dl.value.path()).read_text(encoding="utf-8"))
    assert dl.value.suggested_filename == "苹果_Apples.json"
    assert exported["title"] == "苹果 Apples" and exported["settings"]["system"] == "Be brief."
    assert [(m["role"], m["content"]) for m in exported["messages"]] == [("user", "edited first"),
                                                                         ("assistant", "answer to: edited first")]
    with page.expect_download() as dl:
        page.locator("#exportmd").click()
    markdown = Path(dl.value.path()).read_text(encoding="utf-8")
    assert markdown.startswith("# 苹果 Apples\n") and "## 用户 User\n\nedited first" in markdown

    # delete asks for a second click; the other conversation is shown, and stays after a reload
    page.locator("#delconv").click()
    expect(page.locator("#convlist button.conv")).to_have_count(2)
    page.locator("#delconv").click()
    expect(page.locator("#convlist button.conv")).to_have_text(["B question"])
    assert user_texts(page) == ["B question"]
    page.reload()
    expect(page.locator("#convlist button.conv")).to_have_text(["B question"])
    expect(page.locator(DONE_REPLY)).to_have_count(1)


def test_math_code_and_tool_calls_render(gateway, new_page, shots):
    page = new_page(gateway.url, permissions=["clipboard-read", "clipboard-write"])
    # Pieces split mid-formula and mid-fence, as a stream arrives; GLM-4 writes \( \) and \[ \].
    pieces = ["Inline \\( f(x) = x^", "2 \\) and $e^{i\\pi}+1=0$, costs $5 and $10.\n\n",
              "$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\n\\[ \\sum_{n=1}^\\infty \\frac{1}{n^2} = \\frac{\\pi^2}{6} \\]\n\n",
              "```python\ndef f(x):\n    return x ** 2  # sq", "uare\n```\n",
              # links open apart from the page; other schemes and images (a request elsewhere) are text
              "See [the docs](https://example.com/docs), [this](javascript:window.__pwned=7) and "
              "![a chart](https://example.com/chart.png).\n"]
    tool = [{"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "search_books", "arguments": '{"query": '}}]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '"<img src=x onerror=window.__pwned=5>"}'}}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    body = canned_sse(*pieces, tail=tool)
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, "Show me some maths")
    bubble = page.locator(DONE_REPLY)
    expect(bubble).to_have_count(1)

    # KaTeX: two inline and two display formulas; dollar amounts stay text
    expect(bubble.locator(".katex")).to_have_count(4)
    expect(bubble.locator(".katex-display")).to_have_count(2)
    expect(bubble.locator(".katex annotation").first).to_have_text("f(x) = x^2")
    assert "costs $5 and $10." in bubble.inner_text()
    # its sizes are set through element.style, which the policy allows (no violation was logged),
    # and its fonts come from this origin
    assert page.evaluate("document.querySelectorAll('.katex-html [style]').length") > 0
    assert "KaTeX_Main" in page.evaluate("getComputedStyle(document.querySelector('.katex')).fontFamily")
    assert page.evaluate("document.fonts.ready.then(() => Array.from(document.fonts).filter("
                         "(f) => f.family.includes('KaTeX_Main') && f.status === 'loaded').length)") > 0

    # highlight.js marks the Python block; the copy button copies its code
    code = bubble.locator("pre code.hljs.language-python")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code.locator(".hljs-comment")).to_have_text("# square")
    bubble.locator("button.copy").click()
    expect(bubble.locator("button.copy")).to_have_text("已复制 Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "def f(x):\n    return x ** 2  # square"

    # the tool call: a collapsed block, its arguments as text
    call = bubble.locator("details.toolcall")
    expect(call.locator("summary")).to_have_text("工具调用 Tool call: search_books")
    expect(call.locator("pre")).to_be_hidden()
    call.locator("summary").click()
    expect(call.locator("pre")).to_have_text('{\n  "query": "<img src=x onerror=window.__pwned=5>"\n}')
    expect(page.locator("#log img")).to_have_count(0)
    links = bubble.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/docs")
    expect(links).to_have_attribute("target", "_blank")
    expect(links).to_have_attribute("rel", "noopener noreferrer nofollow")
    assert "this and ![a chart](https://example.com/chart.png)" in bubble.inner_text()
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(shots / "math-code-tools.png"), full_page=True)

    # rendered again from storage after a reload, the same
    page.reload()
    expect(page.locator(DONE_REPLY).locator(".katex")).to_have_count(4)
    expect(page.locator(DONE_REPLY).locator(".hljs-keyword").first).to_have_text("def")


def test_imported_book_is_found_and_markup_in_a_title_is_text(model_server, tmp_path, serve, new_page, shots):
    # Retrieval's candidates are the answer (no model choice), so the imported book is what is found.
    gw = serve.gateway(model_server.url, sqlite_url(tmp_path), search_model_choice="off")
    page = new_page(gw.url)
    tab(page, "catalogue")
    expect(page.locator("#cattotal")).to_contain_text("25")
    title = '量子计算导论 <img src=x onerror="window.__pwned=6">'
    csv = ("title,author,subjects,year,isbn,description\n"
           '"量子计算导论 <img src=x onerror=""window.__pwned=6"">",Michael Nielsen,量子计算;物理,2010,,\n'
           "导入测试：植物学,,生物,,,\n").encode("utf-8")
    page.locator("#importfile").set_input_files(files=[{"name": "books.csv", "mimeType": "text/csv", "buffer": csv}])
    expect(page.locator("#importmsg")).to_contain_text("新增 2 本")
    expect(page.locator("#importprogress")).to_be_hidden()
    row = page.locator("#catlist li", has_text="量子计算导论")
    expect(row.locator(".title")).to_have_text(title)

    # the filter narrows the list to matching books (title, author, subject …)
    page.locator("#catfilter").fill("nielsen 物理")
    expect(page.locator("#catlist li")).to_have_count(1)
    expect(page.locator("#catlist li .title")).to_have_text(title)
    expect(page.locator("#cattotal")).to_contain_text("1 of 27 books match")
    page.screenshot(path=str(shots / "catalogue-filter.png"), full_page=True)
    page.locator("#catfilter").fill("")
    expect(page.locator("#catlist li")).to_have_count(20)

    tab(page, "search")
    page.locator("#query").fill("量子计算导论")
    page.locator("#query").press("Enter")
    expect(page.locator("#searchmsg")).to_have_text(re.compile(r"\d+ ms"))
    hit = page.locator("#results li", has_text="量子计算导论")
    expect(hit.locator(".title")).to_have_text(title)
    expect(hit.locator(".author")).to_have_text("Michael Nielsen")
    expect(hit.locator(".subjects .subject")).to_have_text(["量子计算", "物理"])
    expect(page.locator("#searchwhy")).to_be_hidden()
    expect(page.locator("img")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None

    # nothing found: the page says why, and what to try
    page.locator("#query").fill("有没有关于烹饪的书")
    page.locator("#query").press("Enter")
    expect(page.locator("#searchmsg")).to_contain_text("书籍不存在")
    expect(page.locator("#searchwhy")).to_be_visible()
    expect(page.locator("#searchwhy")).to_contain_text("never the nearest guess")
    page.screenshot(path=str(shots / "search-none.png"), full_page=True)


def test_tool_calls_from_the_server_and_results_sent_back(gateway, new_page, shots):
    get_time = {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                           "required": ["zone"]}}}
    page = new_page(gateway.url)
    page.locator("#settings summary").click()
    page.locator("#tools").fill("[{")
    page.locator("#tools").press("Tab")
    expect(page.locator("#settingserror")).to_contain_text("JSON")
    page.locator("#tools").fill(json.dumps([get_time]))
    page.locator("#tools").press("Tab")
    expect(page.locator("#settingserror")).to_have_text("")
    page.locator("#tool_choice").select_option("required")
    page.locator("#max_tokens").fill("48")
    page.locator("#max_tokens").press("Tab")

    # the embedded model must call (tool_choice required): the streamed call shows as a closed block
    with page.expect_request("**" + CHAT) as req:
        send(page, "What time is it in Tokyo? Use the tool.")
    assert req.value.post_data_json["tools"] == [get_time] and req.value.post_data_json["tool_choice"] == "required"
    bubble = page.locator(DONE_REPLY)
    expect(bubble).to_have_count(1)
    calls = bubble.locator("details.toolcall")
    expect(calls.first.locator("summary")).to_have_text("工具调用 Tool call: get_time")
    expect(bubble).not_to_contain_text("空回复")
    count = calls.count()
    calls.first.locator("summary").click()
    assert "zone" in json.loads(calls.first.locator("pre").inner_text())

    # the person answers each call; results and the call go back, and the model answers in words
    results = page.locator("form.toolresults textarea")
    expect(results).to_have_count(count)
    for i in range(count):
        results.nth(i).fill("12:00 JST")
    page.locator("#tool_choice").select_option("none")
    with page.expect_request("**" + CHAT) as req:
        page.get_by_role("button", name="发送结果 Send results").click()
    sent = req.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant"] + ["tool"] * count
    assert [c["function"]["name"] for c in sent[1]["tool_calls"]] == ["get_time"] * count
    assert [m["tool_call_id"] for m in sent[2:]] == [c["id"] for c in sent[1]["tool_calls"]]
    assert req.value.post_data_json["tool_choice"] == "none"
    expect(page.locator(DONE_REPLY)).to_have_count(2)
    expect(page.locator(".msg.tool")).to_have_count(count)
    expect(page.locator("form.toolresults")).to_have_count(0)
    page.screenshot(path=str(shots / "tool-calls.png"), full_page=True)
    page.reload()
    expect(page.locator(".msg.tool").first).to_contain_text("12:00 JST")
    expect(page.locator(DONE_REPLY).first.locator("details.toolcall")).to_have_count(count)
