// ChatGLM4 Web page: chat (streamed), book search, catalogue. Model output is untrusted: it is
// only ever inserted as text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
let history = [];
let controller = null;
let offset = 0;

function authHeaders() {
  const key = localStorage.getItem("chatglm4.apikey");
  return key ? { Authorization: "Bearer " + key } : {};
}

// A message a person understands, from a failed fetch or an error body.
function humanError(status, body) {
  const detail = body && body.error && body.error.message ? body.error.message : "";
  if (status === 0) return "无法连接服务器 Cannot reach the server. Is it running?";
  if (status === 401) return "需要有效的 API key (401): enter your key at the top right.";
  if (status === 429) return "请求太频繁 Too many requests (429): wait a moment and try again.";
  if (status === 503) return "模型服务暂不可用 The model server is unavailable right now (503). " +
    "It may be starting or stopped; try again shortly." + (detail ? " — " + detail : "");
  if (status === 413) return "内容太长 The request is too large (413).";
  return (detail || "Request failed") + " (" + status + ")";
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
  if (resp.status === 204) return null;
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) throw new Error(humanError(resp.status, data));
  return data;
}

// ---------------------------------------------------------------- tabs
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((x) => x.setAttribute("aria-selected", String(x === b)));
  for (const v of ["chat", "search", "catalogue"]) $("view-" + v).hidden = v !== b.dataset.view;
  if (b.dataset.view === "catalogue") loadCatalogue();
}));

$("savekey").addEventListener("click", () => {
  localStorage.setItem("chatglm4.apikey", $("apikey").value.trim());
  $("apikey").value = "";
});

// ---------------------------------------------------------------- safe Markdown: code blocks and inline code
function renderMarkdown(el, text) {
  el.textContent = "";
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const nl = part.indexOf("\n");
      pre.textContent = nl >= 0 ? part.slice(nl + 1) : part;
      el.appendChild(pre);
    } else {
      part.split("`").forEach((seg, j) => {
        if (j % 2 === 1) { const c = document.createElement("code"); c.textContent = seg; el.appendChild(c); }
        else el.appendChild(document.createTextNode(seg));
      });
    }
  });
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  renderMarkdown(div, text);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// ---------------------------------------------------------------- chat
async function sendChat(prompt) {
  $("chaterror").textContent = "";
  addMessage("user", prompt);
  const bubble = addMessage("assistant", "…");
  bubble.classList.add("streaming");
  let text = "";
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const resp = await fetch("/api/chat", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ prompt, history, stream: true }),
    });
    if (!resp.ok) {
      let data = null; try { data = await resp.json(); } catch (e) { /* not JSON */ }
      throw new Error(humanError(resp.status, data));
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!frame.startsWith("data: ")) continue;
        const data = frame.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(humanError(503, msg));
        const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
        if (delta && delta.content) { text += delta.content; renderMarkdown(bubble, text); }
      }
    }
    history.push({ role: "user", content: prompt }, { role: "assistant", content: text });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "user", content: prompt }, { role: "assistant", content: text });
      renderMarkdown(bubble, text + " [stopped]");
    } else {
      if (!text) bubble.remove();
      $("chaterror").textContent = e.message.startsWith("Failed to fetch") ? humanError(0) : e.message;
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
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
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chatform").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("newchat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = []; $("log").textContent = ""; $("chaterror").textContent = "";
});

// ---------------------------------------------------------------- search
function bookItem(book, withDelete) {
  const li = document.createElement("li");
  const id = document.createElement("span"); id.className = "id"; id.textContent = "#" + book.id;
  const title = document.createElement("span"); title.className = "title"; title.textContent = book.title;
  li.append(id, title);
  if (withDelete) {
    const del = document.createElement("button");
    del.className = "plain"; del.type = "button"; del.textContent = "删除 Delete";
    del.addEventListener("click", async () => {
      try { await api("DELETE", "/api/books/" + book.id); loadCatalogue(); }
      catch (e) { $("caterror").textContent = e.message; }
    });
    li.appendChild(del);
  }
  return li;
}

$("searchform").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  $("searcherror").textContent = ""; $("results").textContent = ""; $("searchmsg").textContent = "搜索中 Searching…";
  $("searchbtn").disabled = true;
  const t0 = performance.now();
  try {
    const data = await api("POST", "/api/books/search", { query });
    const ms = Math.round(performance.now() - t0);
    data.books.forEach((b) => $("results").appendChild(bookItem(b, false)));
    $("searchmsg").textContent = data.message + " · " + ms + " ms";
  } catch (e) {
    $("searchmsg").textContent = "";
    $("searcherror").textContent = e.message;
  } finally {
    $("searchbtn").disabled = false;
  }
});

// ---------------------------------------------------------------- catalogue
async function loadCatalogue() {
  $("caterror").textContent = "";
  try {
    const data = await api("GET", "/api/books?offset=" + offset + "&limit=" + PAGE);
    $("catlist").textContent = "";
    data.books.forEach((b) => $("catlist").appendChild(bookItem(b, true)));
    $("cattotal").textContent = "共 " + data.total + " 本 · " + data.total + " books";
    const pages = Math.max(1, Math.ceil(data.total / PAGE));
    $("pageinfo").textContent = (Math.floor(offset / PAGE) + 1) + " / " + pages;
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= data.total;
  } catch (e) {
    $("caterror").textContent = e.message;
  }
}
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadCatalogue(); });
$("next").addEventListener("click", () => { offset += PAGE; loadCatalogue(); });
$("addform").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const titles = $("newtitles").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!titles.length) return;
  try {
    await api("POST", "/api/books", { titles });
    $("newtitles").value = "";
    loadCatalogue();
  } catch (e) { $("caterror").textContent = e.message; }
});
