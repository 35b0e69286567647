"""`RemoteEngine`: the engine interface over an OpenAI-compatible server (vLLM, SGLang, llama.cpp's
server, or another of our model servers), so `LLMapis.py --engine-url URL` loads no model.

A remote server takes conversations, not prompt ids, so `encode_chat` returns a `ChatPrompt`: a list
of stand-in ids as long as the prompt is estimated to be (what history fitting measures) that also
carries the messages and tools; `generate` sends those. Grammars become what the OpenAI protocol
says instead: `compile_json_schema` gives a `response_format`, `compile_structural_tag` (tool calls)
the `tool_choice`. The kernel keeps the conversation in OpenAI's own shape for this engine (the
`openai` tool dialect), and calls the upstream returns are written into the reply text in the tagged
form that dialect's parser reads back, so the model server's routes stay the same.

Prompt length, in order of preference: the served model's tokenizer from a local folder
(`--tokenizer`), the upstream's `/tokenize` (vLLM, SGLang), else an estimate: one token per CJK
character, one per three other characters, four per message — generous, so a fitted history does
not overflow the upstream's context."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

import requests

from . import EngineBusy, EngineError, EngineStats, FinishReason, GenerationStream, Delta, SamplingParams
from ..config import ENGINE_TOOL_CALL_MODES
from ..toolcalls import TAGGED

log = logging.getLogger(__name__)

# Context length when the upstream says none and --max-context is unset.
DEFAULT_CONTEXT = 4096
# How long an upstream /health answer is reused (the gateway polls ours).
HEALTH_TTL_S = 2.0


class EngineUnavailable(EngineBusy):
    """The upstream server cannot be reached, or says it is down."""


class UpstreamRejected(ValueError):
    """The upstream refused the request as the caller's mistake (a 4xx of its own)."""


class ChatPrompt(list):
    """Stand-in prompt ids (their count is the prompt's length) carrying the conversation itself."""

    def __init__(self, count: int, messages: list[dict], tools: list[dict] | None):
        super().__init__([0] * count)
        self.messages = messages
        self.tools = tools


class TextPrompt(list):
    """Stand-in ids of a plain-text prompt, carrying the text (for /v1/completions)."""

    def __init__(self, count: int, text: str):
        super().__init__([0] * count)
        self.text = text


def estimate_tokens(text: str) -> int:
    """A generous token count: CJK characters are about one token each in GLM-4's and most
    multilingual vocabularies, other text three to four characters a token."""
    cjk = sum(1 for ch in text if "\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uff00" <= ch <= "\uffef")
    return cjk + math.ceil((len(text) - cjk) / 3)


def _message_text(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    calls = json.dumps(message.get("tool_calls"), ensure_ascii=False) if message.get("tool_calls") else ""
    return content + calls


def api_root(url: str) -> str:
    """The server's root from an engine URL given with or without its /v1."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class RemoteEngine:
    """The `Engine` protocol over an OpenAI-compatible HTTP server."""

    tool_dialect = "openai"

    def __init__(self, url: str, *, model: str | None = None, context_length: int | None = None,
                 tokenizer: Any = None, connect_timeout: float = 5.0, read_timeout: float = 300.0,
                 tool_calls: str = "native"):
        if tool_calls not in ENGINE_TOOL_CALL_MODES:
            raise ValueError(f"tool_calls must be one of {', '.join(ENGINE_TOOL_CALL_MODES)}")
        self.root = api_root(url)
        self.tool_calls = tool_calls
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=256)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.observe_ttft = None  # set by the model server, as for the local engine
        self.tokenizer = tokenizer
        self._tokenize_route: str | None = None
        self._lock = threading.Lock()
        self._open: set[GenerationStream] = set()
        self._generated = 0
        self._prompted = 0
        self._closed = False
        self._health: tuple[float, dict] | None = None
        card = self._model_card(required=model is None)
        self.model = model or card["id"]
        self.context_length = context_length or card.get("max_model_len") or self._context_from_health() \
            or DEFAULT_CONTEXT
        if tokenizer is None:
            self._tokenize_route = self._probe_tokenize()
        log.info("remote engine %s: model %s, context %d, prompt length from %s", self.root, self.model,
                 self.context_length, "the local tokenizer" if tokenizer is not None
                 else self._tokenize_route or "an estimate")

    # ------------------------------------------------------------ discovery

    def _model_card(self, required: bool = True) -> dict:
        """The first model the upstream lists ({} when it lists none and one was named for us:
        `transformers serve MODEL` lists only what is in the hub cache)."""
        try:
            resp = self.session.get(self.root + "/v1/models", timeout=(self.timeout[0], 10))
        except requests.RequestException as exc:
            raise EngineUnavailable(f"the engine at {self.root} is unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise EngineUnavailable(f"the engine at {self.root} answered /v1/models with {resp.status_code}")
        try:
            return resp.json()["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            if not required:
                return {}
            raise EngineError(f"the engine at {self.root} lists no model") from None

    def _context_from_health(self) -> int | None:
        # Our own model server says its context in /health; llama.cpp's server in /props.
        for path, read in (("/health", lambda b: b["detail"]["context_length"]),
                           ("/props", lambda b: b["default_generation_settings"]["n_ctx"])):
            try:
                value = read(self.session.get(self.root + path, timeout=(self.timeout[0], 5)).json())
            except (requests.RequestException, ValueError, KeyError, TypeError):
                continue
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _probe_tokenize(self) -> str | None:
        """"/tokenize" when the upstream counts a conversation's tokens there (vLLM, SGLang)."""
        try:
            resp = self.session.post(self.root + "/tokenize", timeout=(self.timeout[0], 10), json={
                "model": self.model, "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True})
            body = resp.json()
        except (requests.RequestException, ValueError):
            return None
        if resp.status_code == 200 and isinstance(body, dict) and isinstance(body.get("count"), int):
            return "/tokenize"
        return None

    # ------------------------------------------------------------ the Engine protocol

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> ChatPrompt:
        # The kernel attaches listed tools to the first message for templates that read them there;
        # the OpenAI protocol takes them beside the messages.
        messages = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
        return ChatPrompt(self._count_chat(messages, tools), messages, tools)

    def encode_text(self, text: str) -> TextPrompt:
        if self.tokenizer is not None:
            count = len(self.tokenizer.encode(text, add_special_tokens=False))
        else:
            count = estimate_tokens(text)
        return TextPrompt(count, text)

    def _count_chat(self, messages: list[dict], tools: list[dict] | None) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                          tokenize=True))
        if self._tokenize_route:
            body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
            if tools:
                body["tools"] = tools
            try:
                resp = self.session.post(self.root + self._tokenize_route, json=body, timeout=(self.timeout[0], 10))
                if resp.status_code == 200:
                    return int(resp.json()["count"])
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                log.warning("upstream /tokenize failed (%s); estimating", type(exc).__name__)
        text = "".join(_message_text(m) for m in messages) + (json.dumps(tools, ensure_ascii=False) if tools else "")
        return estimate_tokens(text) + 4 * len(messages) + 2

    def compile_json_schema(self, schema: dict) -> dict:
        """The schema as an OpenAI `response_format` (what vLLM, SGLang and llama.cpp's server enforce)."""
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": schema, "strict": True}}}

    def compile_structural_tag(self, tag: dict) -> dict:
        """Tool calls: the `openai` dialect's "tag" is already the request's tool_choice fields."""
        return tag

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=len(self._open), tokens_generated=self._generated,
                               prefill_tokens=self._prompted)

    def health(self) -> dict:
        """The upstream's state: {"status": "ok" | "loading" | "unavailable", "reason"?}."""
        now = time.monotonic()
        cached = self._health
        if cached and now - cached[0] < HEALTH_TTL_S:
            return cached[1]
        try:
            resp = self.session.get(self.root + "/health", timeout=(self.timeout[0], 5))
            try:
                said = resp.json().get("status")
            except (ValueError, AttributeError):
                said = None  # vLLM and SGLang answer 200 with an empty body
            if resp.status_code == 200:
                state = {"status": "ok"}
            else:
                state = {"status": said if said in ("loading", "unavailable") else "unavailable",
                         "reason": f"upstream /health answered {resp.status_code}"}
        except requests.RequestException as exc:
            state = {"status": "unavailable", "reason": f"upstream unreachable ({type(exc).__name__})"}
        self._health = (now, state)
        return state

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            streams = list(self._open)
        for stream in streams:
            stream.fail(EngineError("the model server is shutting down"))
            stream.cancel()

    # ------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Sends the request; its answer's status is checked here (a busy upstream raises EngineBusy
        before anything is streamed), the body is read on a thread of its own."""
        if self._closed:
            raise EngineBusy("the model server is shutting down")
        path, body = self._request_body(prompt_ids, params)
        try:
            resp = self.session.post(self.root + path, json=body, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            self._health = None
            raise EngineUnavailable(f"the engine is unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise _status_error(resp)
        stream = GenerationStream(prompt_ids, params)
        with self._lock:
            self._open.add(stream)
        threading.Thread(target=self._relay, args=(resp, stream, path == "/v1/chat/completions",
                                                   self._calls_as_schema(params)),
                         name="remote-stream", daemon=True).start()
        return stream

    def _request_body(self, prompt: list[int], params: SamplingParams) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p}
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        # vLLM's extensions, sent only when asked for (others may reject unknown fields).
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.min_tokens:
            body["min_tokens"] = params.min_tokens
        # Penalties and logit bias, under OpenAI's names (repetition_penalty: vLLM's and SGLang's), sent
        # only when set; read with getattr, as not every SamplingParams carries them.
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name, 0.0):
                body[name] = getattr(params, name)
        if getattr(params, "repetition_penalty", None) not in (None, 1.0):
            body["repetition_penalty"] = params.repetition_penalty
        if getattr(params, "logit_bias", None):
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if isinstance(prompt, TextPrompt):
            return "/v1/completions", {**body, "prompt": prompt.text}
        if not isinstance(prompt, ChatPrompt):
            raise EngineError("the remote engine takes prompts from its own encode_chat/encode_text")
        body["messages"] = prompt.messages
        if isinstance(params.grammar, dict):
            body.update({k: v for k, v in params.grammar.items() if k != "type"})
            if "tool_choice" in params.grammar:
                body["tools"] = prompt.tools
            if self._calls_as_schema(params):
                # The calls as a JSON answer the engine must give; the tools stay listed for its
                # template, with tool_choice "none" so that it does not parse calls of its own.
                body.update(tool_choice="none", response_format={"type": "json_schema", "json_schema": {
                    "name": "tool_calls", "schema": forced_call_schema(prompt.tools or [], params.grammar),
                    "strict": True}})
                body.pop("parallel_tool_calls", None)
        return "/v1/chat/completions", body

    def _calls_as_schema(self, params: SamplingParams) -> bool:
        """Whether this request's forced tool calls travel as a JSON schema (`--engine-tool-calls schema`)."""
        return (self.tool_calls == "schema" and isinstance(params.grammar, dict)
                and forces_calls(params.grammar.get("tool_choice")))

    def _relay(self, resp: requests.Response, stream: GenerationStream, chat: bool, forced: bool = False) -> None:
        """Upstream SSE chunks as Deltas; a cancelled stream closes the upstream response, which
        cancels the generation there. `forced`: the reply is the JSON of forced calls, kept until it
        is whole and then written as calls."""
        prompt_tokens = len(stream.prompt_ids)
        completion = 0
        finish: FinishReason | None = None
        calls = _CallWriter()
        answer: list[str] = []
        try:
            for line in resp.iter_lines(chunk_size=None):
                if stream.abandoned():
                    return
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineError(str(chunk["error"].get("message", chunk["error"])))
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"].get("prompt_tokens", prompt_tokens)
                    completion = chunk["usage"].get("completion_tokens", completion)
                for choice in chunk.get("choices") or []:
                    if chat:
                        delta = choice.get("delta") or {}
                        text = (delta.get("content") or "") + calls.write(delta.get("tool_calls"))
                    else:
                        text = choice.get("text") or ""
                    if forced:
                        answer.append(text)
                        text = ""
                    if choice.get("finish_reason"):
                        finish = FinishReason.LENGTH if choice["finish_reason"] == "length" else FinishReason.STOP
                        text += calls.close() + (forced_calls_text("".join(answer)) if forced and finish is FinishReason.STOP else "")
                    if text:
                        completion += 1
                        if stream.first_token_at is None:
                            stream.first_token_at = time.monotonic()
                            if self.observe_ttft is not None:
                                self.observe_ttft(stream.first_token_at - stream.submitted_at)
                        stream.put(Delta(text, None, prompt_tokens, completion))
            if finish is None:
                raise EngineError("the engine's stream ended without a finish reason")
            stream.put(Delta("", finish, prompt_tokens, completion))
        except (requests.RequestException, ValueError, EngineError) as exc:
            log.warning("remote stream failed: %s", exc)
            self._health = None  # a broken stream may mean a dead upstream: /health asks again
            stream.fail(exc if isinstance(exc, EngineError) else EngineError(f"the engine's stream broke ({type(exc).__name__})"))
        finally:
            resp.close()
            with self._lock:
                self._open.discard(stream)
                self._generated += completion
                self._prompted += prompt_tokens


def forces_calls(choice: Any) -> bool:
    """Whether a tool_choice makes the reply calls: "required" or a named tool."""
    return choice == "required" or isinstance(choice, dict)


def forced_call_schema(tools: list[dict], grammar: dict) -> dict | None:
    """The JSON schema of the calls a request forces: one {"name", "arguments"} object (a named
    tool, or parallel calls off), else an array of at least one; None when calls are not forced."""
    choice = grammar.get("tool_choice")
    if not forces_calls(choice):
        return None
    offered = tools
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        offered = [t for t in tools if t["function"]["name"] == wanted]
    one = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                              "arguments": t["function"].get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False} for t in offered]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if isinstance(choice, dict) or grammar.get("parallel_tool_calls") is False:
        return call
    return {"type": "array", "items": call, "minItems": 1}


def forced_calls_text(answer: str) -> str:
    """A forced-call JSON answer in the tagged form the `openai` dialect's parser reads ("" when it
    does not parse: the reply then has no calls and says so)."""
    try:
        value = json.loads(answer)
    except ValueError:
        log.warning("the engine's forced tool call is not JSON: %.200s", answer)
        return ""
    out = ""
    for call in value if isinstance(value, list) else [value]:
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            out += TAGGED.begin(call["name"]) + json.dumps(call.get("arguments", {}), ensure_ascii=False) + TAGGED.end
    return out


class _CallWriter:
    """Streamed OpenAI `tool_calls` deltas as the tagged text the `openai` dialect's parser reads."""

    def __init__(self) -> None:
        self.index: int | None = None

    def write(self, deltas: list[dict] | None) -> str:
        out = ""
        for delta in deltas or []:
            index = delta.get("index", 0)
            function = delta.get("function") or {}
            if index != self.index and function.get("name"):
                out += self.close() + TAGGED.begin(function["name"])
                self.index = index
            out += function.get("arguments") or ""
        return out

    def close(self) -> str:
        if self.index is None:
            return ""
        self.index = None
        return TAGGED.end


def _status_error(resp: requests.Response) -> Exception:
    try:
        message = str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200] or f"status {resp.status_code}"
    finally:
        resp.close()
    if resp.status_code in (429, 503):
        return EngineBusy(f"the engine is busy: {message}")
    if 400 <= resp.status_code < 500:
        return UpstreamRejected(f"the engine refused the request: {message}")
    return EngineError(f"the engine failed ({resp.status_code}): {message}")


def load_tokenizer(path: str) -> Any:
    """The served model's tokenizer from a local folder (no weights are read)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

