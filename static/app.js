// ChatGLM4 Web page: conversations (streamed, kept in this browser), book search, catalogue.
// Model output and catalogue records are untrusted: records are only ever inserted as text nodes;
// replies go through Markdown with raw HTML escaped, then DOMPurify (see renderMarkdown).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
const KEY = "chatglm4.apikey";
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

// ---------------------------------------------------------------- Markdown, code and math
// Model output is untrusted. marked turns Markdown into HTML with every raw HTML tag in the source
// escaped (so `<img onerror>` shows as text), DOMPurify then sanitises that HTML (defence in depth,
// after rendering), and only then KaTeX and highlight.js decorate the sanitised DOM. KaTeX builds
// its nodes itself and sets sizes through element.style (CSSOM), which the Content-Security-Policy
// allows; parsing its HTML string would carry style attributes, which `style-src 'self'` blocks.
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

const MATH_BLOCK = [/^ {0,3}\$\$([\s\S]+?)\$\$[ \t]*(?:\n+|$)/, /^ {0,3}\\\[([\s\S]+?)\\\][ \t]*(?:\n+|$)/];
// $…$ as pandoc reads it: no space inside either dollar and no digit after the closing one, so
// "costs $5 and $10" stays text.
const MATH_INLINE = [[/^\$\$([\s\S]+?)\$\$/, true], [/^\\\[([\s\S]+?)\\\]/, true], [/^\\\(([\s\S]+?)\\\)/, false],
                     [/^\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/, false]];

const md = new marked.Marked({
  gfm: true, breaks: true,  // chat replies use single newlines as line breaks
  extensions: [
    { name: "mathBlock", level: "block",
      start(src) { const m = src.match(/^ {0,3}(\$\$|\\\[)/m); return m ? m.index : undefined; },
      tokenizer(src) {
        for (const re of MATH_BLOCK) {
          const m = re.exec(src);
          if (m) return { type: "mathBlock", raw: m[0], text: m[1].trim() };
        }
        return undefined;
      },
      renderer(token) { return '<div class="math" data-display="1">' + escapeHtml(token.text) + "</div>\n"; } },
    { name: "mathInline", level: "inline",
      start(src) { const m = src.match(/\$|\\[([]/); return m ? m.index : undefined; },
      tokenizer(src) {
        for (const [re, display] of MATH_INLINE) {
          const m = re.exec(src);
          if (m) return { type: "mathInline", raw: m[0], text: m[1].trim(), display };
        }
        return undefined;
      },
      renderer(token) {
        return '<span class="math" data-display="' + (token.display ? "1" : "0") + '">' + escapeHtml(token.text) + "</span>";
      } },
  ],
  renderer: {
    html(token) { return escapeHtml(token.text); },  // raw HTML in a reply is text, never markup
    code(token) {
      const lang = /^[\w+#.-]{1,32}$/.test(token.lang || "") ? token.lang : "";
      return '<div class="codeblock"><div class="codehead"><span class="lang">' + escapeHtml(lang || "text")
        + '</span><button type="button" class="copy">复制 Copy</button></div><pre><code'
        + (lang ? ' class="language-' + escapeHtml(lang) + '"' : "") + ">" + escapeHtml(token.text) + "\n</code></pre></div>";
    },
    link(token) {  // links open elsewhere and tell that page nothing about this one
      const href = /^(https?:|mailto:)/i.test(token.href || "") ? token.href : "";
      const text = this.parser.parseInline(token.tokens);
      return href ? '<a href="' + escapeHtml(href) + '" target="_blank" rel="noopener noreferrer nofollow">' + text + "</a>" : text;
    },
    image(token) { return escapeHtml(token.raw); },  // an image would be a request to wherever the model says
  },
});

// `streaming`: the reply is still arriving and is rendered again each frame, so code without a
// language is not auto-detected yet (that tries every language; once, at the end, is enough).
function renderMarkdown(el, text, streaming) {
  const html = md.parse(text);
  // target is kept for our own links (all rel=noopener; raw HTML never reaches this far as markup).
  el.replaceChildren(DOMPurify.sanitize(html, { RETURN_DOM_FRAGMENT: true, ADD_ATTR: ["target"],
                                                FORBID_TAGS: ["style", "img", "form", "input"] }));
  el.querySelectorAll(".math").forEach((m) => {
    try {
      katex.render(m.textContent, m, { displayMode: m.dataset.display === "1", throwOnError: false, trust: false, strict: "ignore" });
    } catch (e) { /* a formula KaTeX cannot read stays as its TeX text */ }
  });
  el.querySelectorAll("pre code").forEach((code) => {
    const lang = (code.className.match(/language-(\S+)/) || [])[1];
    if (lang && !hljs.getLanguage(lang)) return;  // unknown language: plain, no guessing
    if (!lang && (streaming || code.textContent.length > 20000)) return;  // auto-detection is slow
    hljs.highlightElement(code);
  });
}

// One listener for every copy button, however often a reply is re-rendered.
document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest && ev.target.closest("button.copy");
  if (!btn) return;
  const code = btn.closest(".codeblock").querySelector("pre code");
  let ok = true;
  try { await navigator.clipboard.writeText(code.textContent.replace(/\n$/, "")); } catch (e) { ok = false; }
  btn.textContent = ok ? "已复制 Copied" : "复制失败 Select and copy";
  btn.classList.toggle("done", ok);
});

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

// ---------------------------------------------------------------- conversations, kept in this browser
// One localStorage entry per conversation (so saving one does not rewrite them all), and the id of
// the one on screen. A conversation: {id, title, named, created, updated, settings, messages}; a
// message: {role, content, note?, stats?, tool_calls?}.
const CONV = "chatglm4.conv.";
const CURRENT = "chatglm4.current";
const SETTINGS = [["system", "sys"], ["temperature", "temperature"], ["top_p", "top_p"], ["max_tokens", "max_tokens"],
                  ["tools", "tools"], ["tool_choice", "tool_choice"]];

// A setting as its field shows it.
function settingText(key, value) {
  if (value === undefined) return "";
  return key === "tools" ? JSON.stringify(value, null, 2) : String(value);
}

// The tools field: an OpenAI `tools` array (functions with a name), or an Error saying what is wrong.
function parseTools(text) {
  let tools;
  try { tools = JSON.parse(text); } catch (e) { return new Error("工具须为 JSON The tools must be JSON: " + e.message); }
  if (!Array.isArray(tools) || !tools.length
      || !tools.every((t) => t && t.type === "function" && t.function && typeof t.function.name === "string")) {
    return new Error('工具格式 The tools must be a list like [{"type": "function", "function": {"name": "get_time", "parameters": {...}}}].');
  }
  return tools;
}

function newConversation() {
  const now = Date.now();
  return { id: now.toString(36) + Math.random().toString(36).slice(2, 8), title: "新对话 New chat", named: false,
           created: now, updated: now, settings: {}, messages: [] };
}

function loadConversation(id) {
  try {
    const c = JSON.parse(localStorage.getItem(CONV + id));
    return c && Array.isArray(c.messages) ? c : null;
  } catch (e) { return null; }
}

function allConversations() {
  const out = [];
  for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i);
    if (k && k.startsWith(CONV)) { const c = loadConversation(k.slice(CONV.length)); if (c) out.push(c); }
  }
  return out.sort((a, b) => b.updated - a.updated);
}

let conv = null;         // the conversation on screen
let controller = null;   // the AbortController of the reply being streamed, if any

// Saves `c` (an empty, unnamed one is not worth a list entry); a full storage is said, not thrown.
function save(c, touch = true) {
  if (c.deleted) return;  // a reply stopped by the delete must not bring it back
  if (touch) c.updated = Date.now();
  if (!c.messages.length && !c.named && !Object.keys(c.settings).length) return;
  try {
    localStorage.setItem(CONV + c.id, JSON.stringify(c));
  } catch (e) {
    $("chaterror").textContent = "浏览器存储已满 This browser's storage is full: export and delete old conversations.";
  }
}

function titleFrom(text) {
  const t = text.replace(/\s+/g, " ").trim();
  return t.length > 40 ? t.slice(0, 40) + "…" : t || "新对话 New chat";
}

function renderList() {
  const list = $("convlist");
  list.textContent = "";
  const convs = allConversations();
  if (conv && !convs.some((c) => c.id === conv.id)) convs.unshift(conv);
  $("convcount").textContent = String(convs.length);
  convs.forEach((c) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button"; b.className = "conv"; b.dataset.id = c.id; b.textContent = c.title;
    b.title = new Date(c.updated).toLocaleString();
    if (conv && c.id === conv.id) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => {
      showList(false);
      if (!conv || c.id !== conv.id) openConversation(c.id);
    });
    li.appendChild(b);
    list.appendChild(li);
  });
}

// Narrow screens only: the list opens over the chat's top (on wide ones it is always shown).
function showList(open) {
  $("view-chat").classList.toggle("convs-open", open);
  $("convtoggle").setAttribute("aria-expanded", String(open));
}
$("convtoggle").addEventListener("click", () => showList(!$("view-chat").classList.contains("convs-open")));

function stopStreaming() {
  if (controller) { controller.abort(); controller = null; }
  setBusy(false);
}

function openConversation(id) {
  stopStreaming();
  conv = (id && loadConversation(id)) || newConversation();
  localStorage.setItem(CURRENT, conv.id);
  $("chaterror").textContent = "";
  $("convtitle").value = conv.title;
  SETTINGS.forEach(([key, el]) => { $(el).value = settingText(key, conv.settings[key]); });
  $("settingserror").textContent = "";
  $("settings").classList.toggle("set", Object.keys(conv.settings).length > 0);
  renderLog();
  renderList();
}

// ---------------------------------------------------------------- the log
function statsText(s) {
  const parts = [];
  if (s.ttft_ms !== undefined) parts.push("首字 TTFT " + (s.ttft_ms / 1000).toFixed(2) + " s");
  if (s.tokens !== undefined) parts.push((s.approx ? "≈" : "") + s.tokens + " tokens");
  if (s.tps !== undefined) parts.push(s.tps.toFixed(1) + " tokens/s");
  return parts.join(" · ");
}

function toolCallsBlock(calls) {
  const box = document.createElement("div");
  box.className = "toolcalls";
  calls.forEach((call) => {
    const d = document.createElement("details");
    d.className = "toolcall";
    const s = document.createElement("summary");
    s.textContent = "工具调用 Tool call: " + ((call.function && call.function.name) || "?");
    const pre = document.createElement("pre");
    let args = (call.function && call.function.arguments) || "";
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* partial or not JSON: as sent */ }
    pre.textContent = args;
    d.append(s, pre);
    box.appendChild(d);
  });
  return box;
}

// Fills an assistant bubble from its message.
function fillAssistant(bubble, m, streaming) {
  // A tool-call block opened while the reply streams stays open through the next re-render.
  const open = Array.from(bubble.querySelectorAll("details.toolcall"), (d) => d.open);
  if (m.content) renderMarkdown(bubble, m.content, streaming); else bubble.textContent = "";
  if (m.tool_calls && m.tool_calls.length) {
    const block = toolCallsBlock(m.tool_calls);
    block.querySelectorAll("details.toolcall").forEach((d, i) => { d.open = Boolean(open[i]); });
    bubble.appendChild(block);
  }
  if (m.note === "empty") { bubble.textContent = "（空回复 The model returned an empty reply.）"; bubble.classList.add("empty"); }
  else if (m.note) note(bubble, (m.content ? " " : "") + "[" + m.note + "]");
}

function smallButton(cls, text, label) {
  const b = document.createElement("button");
  b.type = "button"; b.className = "tiny " + cls; b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  return b;
}

function messageView(m, i) {
  const bubble = document.createElement("div");
  bubble.className = "msg " + m.role;
  bubble.dataset.role = m.role;
  bubble.dataset.index = String(i);
  const bar = document.createElement("div");
  bar.className = "msgbar for-" + m.role;
  if (m.role === "user") {
    bubble.textContent = m.content;
    const edit = smallButton("editmsg", "编辑 Edit", "Edit message " + (i + 1));
    edit.addEventListener("click", () => editMessage(i, bubble, bar));
    bar.appendChild(edit);
  } else if (m.role === "tool") {
    bubble.append(span("toolname", "工具结果 Tool result · " + toolName(i, m.tool_call_id) + "\n"), m.content);
  } else {
    fillAssistant(bubble, m);
    bubble.dataset.done = "true";
    if (m.stats) bar.appendChild(span("stats", statsText(m.stats)));
  }
  return [bubble, bar];
}

// The function name of the call a tool result at `i` answers (from the assistant message before).
function toolName(i, id) {
  for (let j = i - 1; j >= 0; j--) {
    const calls = conv.messages[j].tool_calls;
    if (calls) { const call = calls.find((t) => t.id === id); return call ? call.function.name : "?"; }
  }
  return "?";
}

// Under a last answer that calls tools: one field per call for its result, sent back together.
function toolResultsForm(m) {
  const form = document.createElement("form");
  form.className = "toolresults";
  const fields = m.tool_calls.map((call, k) => {
    const label = document.createElement("label");
    label.textContent = "结果 Result of " + call.function.name;
    const area = document.createElement("textarea");
    area.rows = 1; area.required = true;
    area.setAttribute("aria-label", "Result of " + call.function.name + " (" + (k + 1) + ")");
    label.appendChild(area);
    form.appendChild(label);
    return area;
  });
  const send = document.createElement("button");
  send.type = "submit"; send.className = "primary small"; send.textContent = "发送结果 Send results";
  form.appendChild(send);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (controller) return;
    m.tool_calls.forEach((call, k) => conv.messages.push({ role: "tool", tool_call_id: call.id, content: fields[k].value }));
    save(conv);
    renderLog();
    generate();
  });
  return form;
}

function renderLog() {
  const log = $("log");
  log.textContent = "";
  conv.messages.forEach((m, i) => log.append(...messageView(m, i)));
  markLast();
  scrollDown(true);
}

// Regenerate belongs to the last answer (or to a last question that got none, after an error).
function markLast() {
  document.querySelectorAll("#log .regen, #log form.toolresults").forEach((b) => b.remove());
  const n = conv.messages.length;
  if (!n || controller) return;
  const bars = document.querySelectorAll("#log .msgbar");
  const bar = bars[bars.length - 1];
  const last = conv.messages[n - 1];
  if (last.role === "assistant" && last.tool_calls && last.tool_calls.length) bar.before(toolResultsForm(last));
  const regen = smallButton("regen", "重新生成 Regenerate", "Regenerate the last answer");
  regen.addEventListener("click", regenerate);
  bar.appendChild(regen);
}

function regenerate() {
  if (controller) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  if (!conv.messages.length) return;
  save(conv);
  renderLog();
  generate();
}

// Replaces a sent message's bubble with an editor; Save & resend drops everything after it.
function editMessage(i, bubble, bar) {
  if (controller) return;
  const form = document.createElement("form");
  form.className = "msgedit";
  const area = document.createElement("textarea");
  area.value = conv.messages[i].content; area.rows = 3; area.setAttribute("aria-label", "Edit message");
  const ok = document.createElement("button");
  ok.type = "submit"; ok.className = "primary"; ok.textContent = "保存并重发 Save & resend";
  const cancel = document.createElement("button");
  cancel.type = "button"; cancel.className = "plain"; cancel.textContent = "取消 Cancel";
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  buttons.append(ok, cancel);
  form.append(area, buttons);
  bubble.replaceWith(form);
  bar.hidden = true;
  area.focus();
  cancel.addEventListener("click", renderLog);
  form.addEventListener("keydown", (ev) => { if (ev.key === "Escape") { ev.preventDefault(); renderLog(); } });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = area.value.trim();
    if (!text || controller) return;
    conv.messages = conv.messages.slice(0, i);
    conv.messages.push({ role: "user", content: text });
    if (i === 0 && !conv.named) conv.title = titleFrom(text);
    save(conv);
    $("convtitle").value = conv.title;
    renderLog(); renderList();
    generate();
  });
}

// ---------------------------------------------------------------- chat
class ReplyError extends Error {}

// Reads OpenAI chat chunks as server-sent events, calling onChunk with each parsed chunk.
async function readStream(resp, onChunk) {
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
    if (msg && typeof msg === "object") onChunk(msg);
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

// Streamed tool calls arrive in pieces keyed by index: the first names the call, later ones add
// to its arguments.
function mergeToolCalls(calls, deltas) {
  deltas.forEach((d) => {
    const i = typeof d.index === "number" ? d.index : calls.length;
    const call = calls[i] || (calls[i] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    if (d.function) {
      if (d.function.name) call.function.name += d.function.name;
      if (typeof d.function.arguments === "string") call.function.arguments += d.function.arguments;
    }
  });
}

function setBusy(busy) {
  $("send").disabled = busy; $("stop").disabled = !busy;
  if (busy) $("log").setAttribute("aria-busy", "true"); else $("log").removeAttribute("aria-busy");
}

// The request for the conversation so far: its system prompt and settings, and the messages
// (an answer that never came is left out).
// A tool call goes back to the model only together with its results (the protocol wants every
// call answered); one the user never answered is left out, its text kept.
function chatRequest(c) {
  const messages = [];
  if (c.settings.system) messages.push({ role: "system", content: c.settings.system });
  c.messages.forEach((m, i) => {
    const next = c.messages[i + 1];
    if (m.role === "tool") {
      messages.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    } else if (m.tool_calls && m.tool_calls.length && next && next.role === "tool") {
      messages.push({ role: "assistant", content: m.content || null,
                      tool_calls: m.tool_calls.map((t) => ({ id: t.id, type: "function",
                                                             function: { name: t.function.name, arguments: t.function.arguments } })) });
    } else if (m.content) {
      messages.push({ role: m.role, content: m.content });
    }
  });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  for (const key of ["temperature", "top_p", "max_tokens"]) if (c.settings[key] !== undefined) body[key] = c.settings[key];
  if (c.settings.tools) {
    body.tools = c.settings.tools;
    if (c.settings.tool_choice) body.tool_choice = c.settings.tool_choice;
  }
  return body;
}

// Streams the answer to the conversation's last message into a new assistant message.
async function generate() {
  const c = conv;
  const ctl = new AbortController();
  controller = ctl;
  $("chaterror").textContent = "";
  const body = chatRequest(c);
  const m = { role: "assistant", content: "" };
  const [bubble, bar] = messageView({ role: "assistant", content: "" }, c.messages.length);
  bubble.textContent = "…";
  delete bubble.dataset.done;
  bubble.classList.add("streaming");
  $("log").append(bubble, bar);
  markLast();
  scrollDown(true);
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tLast = null, pieces = 0, usage = null, frame = 0;
  const calls = [];
  const paint = () => {
    frame = 0;
    const stick = nearBottom();
    fillAssistant(bubble, { content: m.content, tool_calls: calls }, true);
    scrollDown(stick);
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: ctl.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw await errorFrom(resp);
    await readStream(resp, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (!delta) return;
      const text = typeof delta.content === "string" ? delta.content : "";
      const toolDeltas = Array.isArray(delta.tool_calls) ? delta.tool_calls : [];
      if (!text && !toolDeltas.length) return;
      tLast = performance.now();
      if (tFirst === null) tFirst = tLast;
      pieces += 1;
      m.content += text;
      mergeToolCalls(calls, toolDeltas);
      // Re-rendering Markdown and math is the costly part: at most once a frame.
      if (!frame) frame = requestAnimationFrame(paint);
    });
    if (!m.content && !calls.length) m.note = "empty";
  } catch (e) {
    if (e.name === "AbortError") {
      m.note = "stopped";
    } else {
      if (m.content || calls.length) m.note = "interrupted";
      if (c === conv) {
        $("chaterror").textContent = e instanceof ReplyError ? e.message
          : e instanceof TypeError ? (m.content ? "连接中断 The connection broke while the reply was arriving. Try again." : humanError(0))
          : e.message;
      }
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (calls.length) m.tool_calls = calls.filter(Boolean).map((t, k) => ({ ...t, id: t.id || "call_" + Date.now().toString(36) + k }));
    if (tFirst !== null) {
      const tokens = usage && usage.completion_tokens ? usage.completion_tokens : pieces;
      m.stats = { ttft_ms: Math.round(tFirst - t0), tokens, approx: !(usage && usage.completion_tokens) };
      // Decoding speed: the tokens after the first over the time they took (not shown when they
      // all came at once, as from a proxy that buffers: that would be no measurement).
      if (tokens > 1 && tLast - tFirst >= 50) m.stats.tps = (tokens - 1) / ((tLast - tFirst) / 1000);
    }
    // A reply stopped before its first word stays, marked, so the stop is visible in the log.
    const kept = m.content || calls.length || m.note === "empty" || m.note === "stopped";
    if (kept) c.messages.push(m);
    save(c);
    if (controller === ctl) controller = null;
    if (c === conv) {
      setBusy(controller !== null);
      if (kept) {
        bubble.classList.remove("streaming");
        fillAssistant(bubble, m);
        if (m.stats) bar.appendChild(span("stats", statsText(m.stats)));
        bubble.dataset.done = "true";
      } else {
        bubble.remove(); bar.remove();
      }
      markLast();
      renderList();
    }
  }
}

function sendChat(prompt) {
  if (!conv.messages.length && !conv.named) conv.title = titleFrom(prompt);
  conv.messages.push({ role: "user", content: prompt });
  save(conv);
  $("convtitle").value = conv.title;
  $("log").append(...messageView(conv.messages[conv.messages.length - 1], conv.messages.length - 1));
  renderList();
  generate();
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
  openConversation(null);
  $("prompt").focus();
});

// Rename: the title field saves as it is left (or on Enter).
$("convtitle").addEventListener("change", () => {
  const t = $("convtitle").value.trim();
  conv.title = t ? t.slice(0, 100) : titleFrom((conv.messages[0] || { content: "" }).content);
  conv.named = Boolean(t);
  $("convtitle").value = conv.title;
  save(conv);
  renderList();
});
$("convtitle").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); $("convtitle").blur(); } });

// Delete asks twice (a second click within the same focus), since there is no undo.
$("delconv").addEventListener("click", () => {
  const b = $("delconv");
  if (!b.classList.contains("confirm")) {
    b.classList.add("confirm"); b.textContent = "确认删除? Confirm delete";
    return;
  }
  b.classList.remove("confirm"); b.textContent = "删除 Delete";
  conv.deleted = true;
  stopStreaming();
  localStorage.removeItem(CONV + conv.id);
  const rest = allConversations();
  openConversation(rest.length ? rest[0].id : null);
});
$("delconv").addEventListener("blur", () => { $("delconv").classList.remove("confirm"); $("delconv").textContent = "删除 Delete"; });

// Settings: empty means the server's default; a value out of range is refused where it is typed.
SETTINGS.forEach(([key, id]) => $(id).addEventListener("change", () => {
  const el = $(id);
  const raw = el.value.trim();
  $("settingserror").textContent = "";
  if (!raw) delete conv.settings[key];
  else if (key === "system" || key === "tool_choice") conv.settings[key] = key === "system" ? el.value : raw;
  else if (key === "tools") {
    const tools = parseTools(raw);
    if (tools instanceof Error) { $("settingserror").textContent = tools.message; return; }
    conv.settings.tools = tools;
  }
  else if (el.checkValidity()) conv.settings[key] = key === "max_tokens" ? parseInt(raw, 10) : parseFloat(raw);
  else { el.reportValidity(); return; }
  $("settings").classList.toggle("set", Object.keys(conv.settings).length > 0);
  save(conv);
  renderList();
}));

// ---------------------------------------------------------------- export
function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url; a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function fileName(c, ext) {
  return (c.title.replace(/[\\/:*?"<>|\s]+/g, "_").slice(0, 60) || "conversation") + "." + ext;
}

$("exportjson").addEventListener("click", () => {
  const { title, created, updated, settings, messages } = conv;
  download(fileName(conv, "json"), "application/json",
           JSON.stringify({ title, created: new Date(created).toISOString(), updated: new Date(updated).toISOString(),
                            settings, messages }, null, 2));
});
$("exportmd").addEventListener("click", () => {
  const out = ["# " + conv.title, ""];
  if (conv.settings.system) out.push("**系统 System:** " + conv.settings.system, "");
  conv.messages.forEach((m) => {
    out.push(m.role === "user" ? "## 用户 User" : m.role === "tool" ? "## 工具结果 Tool result" : "## 助手 Assistant", "",
             m.content || "");
    (m.tool_calls || []).forEach((t) => out.push("", "```json", "// tool call: " + t.function.name, t.function.arguments, "```"));
    out.push("");
  });
  download(fileName(conv, "md"), "text/markdown", out.join("\n"));
});

// Another tab of this page changed the list: show it (the conversation on screen is reloaded only
// when nothing is streaming into it).
window.addEventListener("storage", (ev) => {
  if (!ev.key || !ev.key.startsWith(CONV)) return;
  if (conv && ev.key === CONV + conv.id && !controller) {
    const fresh = loadConversation(conv.id);
    if (fresh) { conv = fresh; $("convtitle").value = conv.title; renderLog(); }
  }
  renderList();
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
  $("searchwhy").hidden = true;
  $("searchbtn").disabled = true;
  const t0 = performance.now();
  try {
    const data = await api("POST", "/api/books/search", { query });
    const ms = Math.round(performance.now() - t0);
    data.books.forEach((b) => $("results").appendChild(bookItem(b, false)));
    $("searchmsg").textContent = data.message + " · 用时 " + ms + " ms";
    // Search answers only with books that exist, never the nearest one: say so, and what helps.
    $("searchwhy").hidden = data.books.length > 0;
    $("searchwhy").textContent = typeof data.reason === "string" && data.reason ? data.reason
      : "目录里没有足够相关的书。搜索只回答目录中确实相关的书，不会拿最接近的凑数。可以换用书名里的词、作者名或主题再试，或在“书目”里浏览。"
        + " No book in the catalogue is close enough to this request: search answers only with books that really match,"
        + " never the nearest guess. Try words from a title, an author's name or a subject, or browse the catalogue.";
  } catch (e) {
    $("searchmsg").textContent = "";
    $("searcherror").textContent = e.message;
  } finally {
    $("searchbtn").disabled = false;
  }
});

// ---------------------------------------------------------------- catalogue
let catRequest = 0;

// The filter reads the whole catalogue in pages of 1,000 (the list route has no search of its own)
// up to FILTER_LIMIT books, enough for a library's shelf list; past that only those are filtered.
const FILTER_LIMIT = 20000;
let filterText = "";

async function fetchPage(off, limit) {
  return api("GET", "/api/books?offset=" + off + "&limit=" + limit);
}

// A book matches when every word of the filter is in its title, author, subjects, ISBN, year or #id.
function matches(book, words) {
  const hay = [book.title, book.author || "", (book.subjects || []).join(" "), book.isbn || "",
               book.year === null || book.year === undefined ? "" : String(book.year), "#" + book.id].join(" ").toLowerCase();
  return words.every((w) => hay.includes(w));
}

// The page of books at `offset` and the total: straight from the server, or filtered here.
async function catalogueSlice() {
  if (!filterText) {
    const data = await fetchPage(offset, PAGE);
    return { books: data.books, total: data.total, all: data.total, fetch: (off) => fetchPage(off, PAGE) };
  }
  let all = [], total = 0;
  do {
    const data = await fetchPage(all.length, 1000);
    total = data.total;
    all = all.concat(data.books);
    if (!data.books.length) break;
  } while (all.length < Math.min(total, FILTER_LIMIT));
  const words = filterText.toLowerCase().split(/\s+/).filter(Boolean);
  const hits = all.filter((b) => matches(b, words));
  return { books: hits.slice(offset, offset + PAGE), total: hits.length, all: total, partial: total > all.length,
           fetch: async (off) => ({ books: hits.slice(off, off + PAGE), total: hits.length }) };
}

// Shows the page at `offset`; {last: true} turns to the last page; `fresh` ids are highlighted.
async function loadCatalogue(opts = {}) {
  const mine = ++catRequest;
  $("caterror").textContent = "";
  try {
    const slice = await catalogueSlice();
    let data = slice;
    const lastOffset = Math.max(0, Math.ceil(slice.total / PAGE) - 1) * PAGE;
    // past the end (the last book of the last page was deleted) or asked for the last page
    if ((opts.last && offset !== lastOffset) || (!data.books.length && offset > 0)) {
      offset = opts.last ? lastOffset : Math.min(offset - PAGE, lastOffset);
      offset = Math.max(0, offset);
      data = await slice.fetch(offset);
    }
    if (mine !== catRequest) return;
    const fresh = new Set(opts.fresh || []);
    $("catlist").textContent = "";
    data.books.forEach((b) => {
      const li = bookItem(b, true);
      if (fresh.has(b.id)) li.classList.add("new");
      $("catlist").appendChild(li);
    });
    $("cattotal").textContent = filterText
      ? "筛选出 " + slice.total + " / " + slice.all + " 本 · " + slice.total + " of " + slice.all + " books match"
        + (slice.partial ? " (the first " + FILTER_LIMIT + " searched)" : "")
      : "共 " + data.total + " 本 · " + data.total + " books";
    const pages = Math.max(1, Math.ceil(slice.total / PAGE));
    $("pageinfo").textContent = (Math.floor(offset / PAGE) + 1) + " / " + pages;
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= slice.total;
  } catch (e) {
    if (mine !== catRequest) return;
    $("catlist").textContent = "";
    $("cattotal").textContent = ""; $("pageinfo").textContent = "";
    $("caterror").textContent = e.message;
  }
}

// Typing filters after a short pause (one catalogue read per pause, not per key).
let filterTimer = 0;
$("catfilter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    const text = $("catfilter").value.trim();
    if (text === filterText) return;
    filterText = text; offset = 0; $("catmsg").textContent = "";
    loadCatalogue();
  }, 250);
});
$("catfilter").addEventListener("keydown", (ev) => { if (ev.key === "Enter") ev.preventDefault(); });

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

// POSTs a file with upload progress (fetch reports none), answering like api(): the JSON body, or
// an Error with a sentence.
function upload(path, file, type, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Content-Type", type);
    const auth = authHeaders();
    if (auth.Authorization) xhr.setRequestHeader("Authorization", auth.Authorization);
    xhr.upload.addEventListener("progress", (ev) => { if (ev.lengthComputable) onProgress(ev.loaded / ev.total); });
    xhr.upload.addEventListener("load", () => onProgress(1));
    xhr.addEventListener("error", () => reject(new Error(humanError(0))));
    xhr.addEventListener("load", () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
      if (xhr.status >= 200 && xhr.status < 300 && data) resolve(data);
      else reject(new Error(humanError(xhr.status >= 200 && xhr.status < 300 ? 502 : xhr.status, data,
                                       xhr.getResponseHeader("Retry-After"))));
    });
    xhr.send(file);
  });
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
    const r = await upload("/api/books/import", file, type, (sent) => {
      $("importprogress").hidden = false;
      $("importprogress").value = sent;
      $("importmsg").textContent = sent < 1 ? "上传中 Uploading " + file.name + "… " + Math.round(sent * 100) + "%"
        : "导入中 Checking and importing " + file.name + "…";
    });
    $("importmsg").textContent = "已导入 " + file.name + "：新增 " + r.added + " 本，已有 " + r.present + " 本 · "
      + r.added + " added, " + r.present + " already present (" + r.lines + " records).";
    // New books get the highest ids: show the last page, where they landed.
    await loadCatalogue(r.added ? { last: true } : {});
  } catch (e) {
    $("importmsg").textContent = "";
    $("importerror").textContent = e.message;
  } finally {
    $("importprogress").hidden = true;
    input.value = "";  // choosing the same file again imports it again
    input.disabled = false;
    $("importbtn").classList.remove("busy");
  }
});

// The conversation on screen when the page was left (or a new one).
openConversation(localStorage.getItem(CURRENT));
