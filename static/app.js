// ChatGLM4 Web page: chat (streamed), book search, catalogue. Model output is untrusted: it is
// only ever inserted as text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
const KEY = "chatglm4.apikey";
let turns = [];          // the conversation sent as `history`
let conversation = 0;    // bumped by New: a reply still arriving for an older conversation is dropped
let controller = null;   // the AbortController of the reply being streamed, if any
let offset = 0;

function authHeaders() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

// A message a person understands, from a failed fetch (status 0) or an error response.
function humanError(status, body, retryAfter) {
  const err = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : {};
  const detail = typeof err.message === "string" ? err.message : "";
  const code = typeof err.code === "string" ? err.code : "";
  const wait = retryAfter && /^\d+$/.test(retryAfter) ? " Try again in " + retryAfter + " s." : " Try again shortly.";
  if (status === 0) return "无法连接服务器 Cannot reach the server: check the network, or whether the service is running.";
  if (status === 401) return "需要有效的 API key (401): enter a valid key in the API key box at the top and press Save.";
  if (status === 429) return "请求太频繁 Too many requests (429): slow down a little." + wait;
  if (status === 413) return "内容太长 The request is too large (413): shorten it and try again.";
  if (status === 404) return "未找到 Not found (404): it may have been deleted already.";
  if (status === 503) {
    if (/database/i.test(detail)) return "书目数据库暂不可用 The catalogue database is unavailable right now (503)." + wait;
    if (code === "loading") return "模型正在加载 The model is still loading (503)." + wait;
    if (code === "queue_full") return "模型服务繁忙 The model server is busy (503)." + wait;
    if (code === "upstream_timeout") return "模型响应超时 The model took too long to answer (503)." + wait;
    return "模型服务暂不可用 The model server is unavailable right now (503); it may be starting or stopped." + wait;
  }
  if (status >= 500) return "服务器出错 Something went wrong on the server (" + status + ")." + wait;
  if (status === 400 || status === 422) return "请求无效 The request was not accepted (" + status + ")" + (detail ? ": " + detail : ".");
  return "请求失败 The request failed (" + status + ")" + (detail ? ": " + detail : ".");
}

async function errorFrom(resp) {
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  return new Error(humanError(resp.status, data, resp.headers.get("Retry-After")));
}

async function api(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, {
      method, headers: { "Content-Type": "application/json", ...authHeaders() },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error(humanError(0));
  }
  if (!resp.ok) throw await errorFrom(resp);
  if (resp.status === 204) return null;
  try { return await resp.json(); } catch (e) { throw new Error(humanError(resp.status >= 500 ? resp.status : 502)); }
}

// ---------------------------------------------------------------- tabs
function currentView() {
  const b = document.querySelector('nav button[aria-selected="true"]');
  return b ? b.dataset.view : "chat";
}

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((x) => x.setAttribute("aria-selected", String(x === b)));
  for (const v of ["chat", "search", "catalogue"]) $("view-" + v).hidden = v !== b.dataset.view;
  if (b.dataset.view === "catalogue") loadCatalogue();
}));

// ---------------------------------------------------------------- API key
function showKeyState() {
  $("apikey").placeholder = localStorage.getItem(KEY) ? "API key ✓ saved" : "API key";
}
$("keybox").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("apikey").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);  // Save on empty forgets it
  $("apikey").value = "";
  showKeyState();
  for (const id of ["chaterror", "searcherror", "caterror"]) $(id).textContent = "";
  if (currentView() === "catalogue") loadCatalogue();
});
showKeyState();

// ---------------------------------------------------------------- safe Markdown: code blocks and inline code
function renderInline(el, text) {
  const segs = text.split("`");
  // An unmatched backtick (odd count) stays literal: only closed pairs become code.
  const closed = segs.length % 2 === 1 ? segs.length : segs.length - 1;
  let plain = "";
  segs.forEach((seg, j) => {
    if (j % 2 === 1 && j < closed) {
      if (plain) { el.appendChild(document.createTextNode(plain)); plain = ""; }
      const c = document.createElement("code"); c.textContent = seg; el.appendChild(c);
    } else {
      plain += (j >= closed ? "`" : "") + seg;
    }
  });
  if (plain) el.appendChild(document.createTextNode(plain));
}

function renderMarkdown(el, text) {
  el.textContent = "";
  // ``` fences: odd parts are code. An unclosed fence (while streaming) shows as code so far.
  text.split("```").forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      if (lang && !/\s/.test(lang)) pre.dataset.lang = lang;
      pre.textContent = nl >= 0 ? part.slice(nl + 1) : part;
      el.appendChild(pre);
    } else {
      renderInline(el, part);
    }
  });
}

function note(el, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  el.appendChild(span);
}

function nearBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 60;
}
function scrollDown(force) {
  if (force || nearBottom()) $("log").scrollTop = $("log").scrollHeight;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  if (role === "user") div.textContent = text; else renderMarkdown(div, text);
  $("log").appendChild(div);
  scrollDown(true);
  return div;
}

// ---------------------------------------------------------------- chat
class ReplyError extends Error {}

// Reads OpenAI chat chunks as server-sent events, calling onText with each piece of content.
async function readStream(resp, onText) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buf = "";
  const handle = (frame) => {
    const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (!data || data === "[DONE]") return;
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }  // not a chunk: skip it
    if (msg && msg.error) {
      const detail = typeof msg.error.message === "string" ? msg.error.message : "unknown error";
      throw new ReplyError("回复中断 The reply was cut off: " + detail + ". Try again.");
    }
    const delta = msg && msg.choices && msg.choices[0] && msg.choices[0].delta;
    if (delta && typeof delta.content === "string" && delta.content) onText(delta.content);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut); buf = buf.slice(cut + 2);
      handle(frame);
    }
  }
  if (buf.trim()) handle(buf);
}

function setBusy(busy) {
  $("send").disabled = busy; $("stop").disabled = !busy;
  if (busy) $("log").setAttribute("aria-busy", "true"); else $("log").removeAttribute("aria-busy");
}

async function sendChat(prompt) {
  const mine = conversation;
  const ctl = new AbortController();
  controller = ctl;
  $("chaterror").textContent = "";
  const history = turns.slice();
  addMessage("user", prompt);
  const bubble = addMessage("assistant", "…");
  bubble.classList.add("streaming");
  let text = "";
  setBusy(true);
  const keep = () => {
    if (mine === conversation && text) turns.push({ role: "user", content: prompt }, { role: "assistant", content: text });
  };
  try {
    const resp = await fetch("/api/chat", {
      method: "POST", signal: ctl.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ prompt, history, stream: true }),
    });
    if (!resp.ok) throw await errorFrom(resp);
    await readStream(resp, (piece) => {
      const stick = nearBottom();
      text += piece;
      renderMarkdown(bubble, text);
      scrollDown(stick);
    });
    keep();
    if (!text) { bubble.textContent = "（空回复 The model returned an empty reply.）"; bubble.classList.add("empty"); }
  } catch (e) {
    if (e.name === "AbortError") {
      keep();
      renderMarkdown(bubble, text);
      note(bubble, (text ? " " : "") + "[stopped]");
    } else {
      keep();
      if (!text) bubble.remove(); else note(bubble, " [interrupted]");
      if (mine === conversation) {
        $("chaterror").textContent = e instanceof ReplyError ? e.message
          : e instanceof TypeError ? (text ? "连接中断 The connection broke while the reply was arriving. Try again." : humanError(0))
          : e.message;
      }
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    if (controller === ctl) { controller = null; setBusy(false); }
  }
}

$("chatform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  sendChat(prompt);
});
$("prompt").addEventListener("keydown", (ev) => {
  // Enter that confirms an IME composition (Chinese input) is not a send.
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault(); $("chatform").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("newchat").addEventListener("click", () => {
  conversation += 1;
  if (controller) { controller.abort(); controller = null; }
  setBusy(false);
  turns = []; $("log").textContent = ""; $("chaterror").textContent = "";
  $("prompt").focus();
});

// ---------------------------------------------------------------- search
function bookItem(book, withDelete) {
  const li = document.createElement("li");
  li.dataset.id = String(book.id);
  const id = document.createElement("span"); id.className = "id"; id.textContent = "#" + book.id;
  const title = document.createElement("span"); title.className = "title"; title.textContent = book.title;
  li.append(id, title);
  if (withDelete) {
    const del = document.createElement("button");
    del.className = "plain"; del.type = "button";
    const en = document.createElement("span"); en.className = "en"; en.textContent = " Delete";
    del.append("删除", en);
    del.setAttribute("aria-label", "Delete #" + book.id);
    del.addEventListener("click", async () => {
      del.disabled = true;
      let failure = "";
      try { await api("DELETE", "/api/books/" + book.id); } catch (e) { failure = e.message; }
      await loadCatalogue();
      if (failure) $("caterror").textContent = failure;
      else $("catmsg").textContent = "已删除 Deleted #" + book.id + " " + book.title;
    });
    li.appendChild(del);
  }
  return li;
}

$("searchform").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const query = $("query").value.trim();
  if (!query || $("searchbtn").disabled) return;
  $("searcherror").textContent = ""; $("results").textContent = ""; $("searchmsg").textContent = "搜索中 Searching…";
  $("searchbtn").disabled = true;
  const t0 = performance.now();
  try {
    const data = await api("POST", "/api/books/search", { query });
    const ms = Math.round(performance.now() - t0);
    data.books.forEach((b) => $("results").appendChild(bookItem(b, false)));
    $("searchmsg").textContent = data.message + " · 用时 " + ms + " ms";
  } catch (e) {
    $("searchmsg").textContent = "";
    $("searcherror").textContent = e.message;
  } finally {
    $("searchbtn").disabled = false;
  }
});

// ---------------------------------------------------------------- catalogue
let catRequest = 0;

// Shows the page at `offset`; {last: true} turns to the last page; `fresh` ids are highlighted.
async function loadCatalogue(opts = {}) {
  const mine = ++catRequest;
  $("caterror").textContent = "";
  try {
    let data = await api("GET", "/api/books?offset=" + offset + "&limit=" + PAGE);
    const lastOffset = Math.max(0, Math.ceil(data.total / PAGE) - 1) * PAGE;
    // past the end (the last book of the last page was deleted) or asked for the last page
    if ((opts.last && offset !== lastOffset) || (!data.books.length && offset > 0)) {
      offset = opts.last ? lastOffset : Math.min(offset - PAGE, lastOffset);
      offset = Math.max(0, offset);
      data = await api("GET", "/api/books?offset=" + offset + "&limit=" + PAGE);
    }
    if (mine !== catRequest) return;
    const fresh = new Set(opts.fresh || []);
    $("catlist").textContent = "";
    data.books.forEach((b) => {
      const li = bookItem(b, true);
      if (fresh.has(b.id)) li.classList.add("new");
      $("catlist").appendChild(li);
    });
    $("cattotal").textContent = "共 " + data.total + " 本 · " + data.total + " books";
    const pages = Math.max(1, Math.ceil(data.total / PAGE));
    $("pageinfo").textContent = (Math.floor(offset / PAGE) + 1) + " / " + pages;
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= data.total;
  } catch (e) {
    if (mine !== catRequest) return;
    $("catlist").textContent = "";
    $("cattotal").textContent = ""; $("pageinfo").textContent = "";
    $("caterror").textContent = e.message;
  }
}
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); $("catmsg").textContent = ""; loadCatalogue(); });
$("next").addEventListener("click", () => { offset += PAGE; $("catmsg").textContent = ""; loadCatalogue(); });
$("addform").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const titles = $("newtitles").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!titles.length) return;
  $("addbtn").disabled = true;
  try {
    const data = await api("POST", "/api/books", { titles });
    $("newtitles").value = "";
    const ids = data.books.map((b) => b.id);
    $("catmsg").textContent = "已添加 Added " + data.books.map((b) => "#" + b.id + " " + b.title).join(", ");
    // New books get the highest ids, so they are on the last page.
    await loadCatalogue({ last: true, fresh: ids });
  } catch (e) {
    $("caterror").textContent = e.message;
  } finally {
    $("addbtn").disabled = false;
  }
});
