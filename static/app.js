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
  if (status === 409) return "冲突 Conflict (409)" + (detail ? ": " + detail : ": the change clashes with another book.");
  if (status === 400 && code === "malformed_file") return "文件有误，未导入 The file was not imported (400)" + (detail ? ": " + detail : ".");
  if (status === 415) return "文件类型不支持 Unsupported file type (415)" + (detail ? ": " + detail : ".");
  if (status === 400 || status === 422) return "请求无效 The request was not accepted (" + status + ")" + (detail ? ": " + detail : ".");
  return "请求失败 The request failed (" + status + ")" + (detail ? ": " + detail : ".");
}

async function errorFrom(resp) {
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  return new Error(humanError(resp.status, data, resp.headers.get("Retry-After")));
}

// A JSON request; `raw` = {body, type} sends a body as is (a file upload) with that Content-Type.
async function api(method, path, body, raw) {
  let resp;
  try {
    resp = await fetch(path, {
      method, headers: { "Content-Type": raw ? raw.type : "application/json", ...authHeaders() },
      body: raw ? raw.body : body === undefined ? undefined : JSON.stringify(body),
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
  for (const id of ["chaterror", "searcherror", "caterror", "importerror"]) $(id).textContent = "";
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

// ---------------------------------------------------------------- book rows
function span(cls, text) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

function button(cls, zh, en, label) {
  const b = document.createElement("button");
  b.className = cls; b.type = "button";
  b.append(zh, span("en", " " + en));
  if (label) b.setAttribute("aria-label", label);
  return b;
}

// Author, year and subjects under the title (only those the book has).
function bookMeta(book) {
  const meta = document.createElement("div");
  meta.className = "meta";
  if (book.author) meta.appendChild(span("author", book.author));
  if (book.year !== null && book.year !== undefined) meta.appendChild(span("year", String(book.year)));
  if (book.subjects && book.subjects.length) {
    const subjects = document.createElement("span");
    subjects.className = "subjects";
    subjects.setAttribute("aria-label", "Subjects: " + book.subjects.join("; "));
    book.subjects.forEach((s) => subjects.appendChild(span("subject", s)));
    meta.appendChild(subjects);
  }
  return meta;
}

// A search result or (withActions) a catalogue row with Edit and Delete.
function bookItem(book, withActions) {
  const li = document.createElement("li");
  li.dataset.id = String(book.id);
  const info = document.createElement("div");
  info.className = "book";
  info.appendChild(span("title", book.title));
  const meta = bookMeta(book);
  if (meta.childNodes.length) info.appendChild(meta);
  li.append(span("id", "#" + book.id), info);
  if (withActions) {
    const actions = document.createElement("div");
    actions.className = "rowactions";
    const edit = button("plain edit", "编辑", "Edit", "Edit #" + book.id);
    edit.addEventListener("click", () => openEditor(li, book));
    const del = button("plain delete", "删除", "Delete", "Delete #" + book.id);
    del.addEventListener("click", async () => {
      del.disabled = true;
      let failure = "";
      try { await api("DELETE", "/api/books/" + book.id); } catch (e) { failure = e.message; }
      await loadCatalogue();
      if (failure) $("caterror").textContent = failure;
      else $("catmsg").textContent = "已删除 Deleted #" + book.id + " " + book.title;
    });
    actions.append(edit, del);
    li.appendChild(actions);
  }
  return li;
}

// "a; b；c" -> ["a", "b", "c"] (a full-width ； from a Chinese keyboard counts too).
function splitSubjects(text) {
  const out = [];
  text.split(/[;；]/).map((s) => s.trim()).filter(Boolean).forEach((s) => { if (!out.includes(s)) out.push(s); });
  return out;
}

// "" -> null, "1999" -> 1999, anything else -> undefined (not a year).
function parseYear(text) {
  const t = text.trim();
  if (!t) return null;
  return /^-?\d{1,4}$/.test(t) ? parseInt(t, 10) : undefined;
}

const YEAR_ERROR = "年份须为整数 The year must be a whole number, such as 1999.";

function field(form, name, labelText, value, wide) {
  const id = "edit-" + name + "-" + form.dataset.id;
  const label = document.createElement("label");
  label.htmlFor = id; label.textContent = labelText;
  const input = document.createElement("input");
  input.type = "text"; input.id = id; input.name = name; input.value = value;
  input.autocomplete = "off";
  if (name === "year") input.inputMode = "numeric";
  if (wide) input.className = "wide";
  form.append(label, input);
  return input;
}

// Replaces the row's content with a form prefilled from `book`; Save sends the changed fields only.
function openEditor(li, book) {
  const row = Array.from(li.childNodes);
  li.textContent = "";
  li.classList.remove("new");
  li.classList.add("editing");
  const form = document.createElement("form");
  form.className = "edit";
  form.dataset.id = String(book.id);
  form.setAttribute("aria-label", "Edit #" + book.id);
  const title = field(form, "title", "书名 Title", book.title, true);
  const author = field(form, "author", "作者 Author", book.author || "", false);
  const year = field(form, "year", "年份 Year", book.year === null || book.year === undefined ? "" : String(book.year), false);
  const subjects = field(form, "subjects", "主题 Subjects", (book.subjects || []).join("; "), true);
  subjects.placeholder = "separated by ;";
  const error = document.createElement("div");
  error.className = "error editerror"; error.setAttribute("role", "alert");
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const save = document.createElement("button");
  save.className = "primary save"; save.type = "submit"; save.textContent = "保存 Save";
  const cancel = document.createElement("button");
  cancel.className = "plain cancel"; cancel.type = "button"; cancel.textContent = "取消 Cancel";
  buttons.append(save, cancel, span("hint", "#" + book.id + " · Esc to cancel"));
  form.append(error, buttons);
  li.appendChild(form);
  title.focus();

  const restore = () => {
    li.textContent = "";
    li.classList.remove("editing");
    li.append(...row);
    const edit = li.querySelector("button.edit");
    if (edit) edit.focus();
  };
  cancel.addEventListener("click", restore);
  form.addEventListener("keydown", (ev) => { if (ev.key === "Escape") { ev.preventDefault(); restore(); } });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (save.disabled) return;
    error.textContent = "";
    const changes = {};
    const newTitle = title.value.trim();
    if (!newTitle) { error.textContent = "书名不能为空 The title cannot be empty."; title.focus(); return; }
    if (newTitle !== book.title) changes.title = newTitle;
    const newAuthor = author.value.trim() || null;
    if (newAuthor !== (book.author || null)) changes.author = newAuthor;
    const newSubjects = splitSubjects(subjects.value);
    if (JSON.stringify(newSubjects) !== JSON.stringify(book.subjects || [])) changes.subjects = newSubjects;
    const newYear = parseYear(year.value);
    if (newYear === undefined) { error.textContent = YEAR_ERROR; year.focus(); return; }
    if (newYear !== (book.year === undefined ? null : book.year)) changes.year = newYear;
    if (!Object.keys(changes).length) { restore(); $("catmsg").textContent = "没有改动 Nothing changed for #" + book.id; return; }
    save.disabled = true; cancel.disabled = true;
    try {
      const updated = await api("PATCH", "/api/books/" + book.id, changes);
      const fresh = bookItem(updated, true);
      fresh.classList.add("new");
      li.replaceWith(fresh);
      $("catmsg").textContent = "已保存 Saved #" + updated.id + " " + updated.title;
      const edit = fresh.querySelector("button.edit");
      if (edit) edit.focus();
    } catch (e) {
      error.textContent = e.message;
      save.disabled = false; cancel.disabled = false;
    }
  });
}

// ---------------------------------------------------------------- search
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
  // The optional fields go with every title of the list.
  const extra = {};
  const author = $("newauthor").value.trim();
  if (author) extra.author = author;
  const subjects = splitSubjects($("newsubjects").value);
  if (subjects.length) extra.subjects = subjects;
  const year = parseYear($("newyear").value);
  if (year === undefined) { $("caterror").textContent = YEAR_ERROR; $("newyear").focus(); return; }
  if (year !== null) extra.year = year;
  $("caterror").textContent = "";
  $("addbtn").disabled = true;
  try {
    const data = await api("POST", "/api/books", { books: titles.map((title) => ({ title, ...extra })) });
    for (const id of ["newtitles", "newauthor", "newsubjects", "newyear"]) $(id).value = "";
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


// ---------------------------------------------------------------- import a file
// The Content-Type the import route expects, from the file's name (or the type the browser gives).
function importType(file) {
  const name = file.name.toLowerCase();
  if (name.endsWith(".csv") || file.type === "text/csv") return "text/csv";
  if (name.endsWith(".jsonl") || name.endsWith(".ndjson") || file.type === "application/x-ndjson") return "application/x-ndjson";
  return "";
}

$("importfile").addEventListener("change", async () => {
  const input = $("importfile");
  const file = input.files && input.files[0];
  if (!file || input.disabled) return;
  $("importmsg").textContent = ""; $("importerror").textContent = ""; $("catmsg").textContent = "";
  const type = importType(file);
  if (!type) {
    $("importerror").textContent = "文件类型不支持 Choose a .csv or .jsonl file (" + file.name + " is neither).";
    input.value = "";
    return;
  }
  input.disabled = true;
  $("importbtn").classList.add("busy");
  $("importmsg").textContent = "导入中 Importing " + file.name + "…";
  try {
    const r = await api("POST", "/api/books/import", undefined, { body: file, type });
    $("importmsg").textContent = "已导入 " + file.name + "：新增 " + r.added + " 本，已有 " + r.present + " 本 · "
      + r.added + " added, " + r.present + " already present (" + r.lines + " records).";
    // New books get the highest ids: show the last page, where they landed.
    await loadCatalogue(r.added ? { last: true } : {});
  } catch (e) {
    $("importmsg").textContent = "";
    $("importerror").textContent = e.message;
  } finally {
    input.value = "";  // choosing the same file again imports it again
    input.disabled = false;
    $("importbtn").classList.remove("busy");
  }
});
