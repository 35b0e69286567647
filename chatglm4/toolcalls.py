"""Tool calls: how tools reach the prompt, the grammar that keeps every call valid, and reading the
calls back out of the generated text (whole or streamed).

A *dialect* is how a model writes a call:

- `glm4`, GLM-4's own: the tools are listed by its chat template (in the system turn), a call is a
  reply that starts `name\\n` followed by the arguments as JSON, and the tool's result comes back as
  an `observation` turn (`<|observation|>` is one of its stop tokens). One call per turn.
- `tagged`, for models whose template has no tools (the embedded SmolLM2): a system prompt from
  `templates/tools.system.j2` lists them, and a call is
  `<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>`; results come back in a user turn.
- `openai`, for an engine that is itself an OpenAI-compatible server (`engine/remote.py`): messages
  keep OpenAI's shape, the tools and `tool_choice` travel as request fields, and the calls the
  server returns are written into the reply in the tagged form, which is how they are read back.

Validity comes from the grammar, not from parsing luck: with `tool_choice` "auto" the reply is free
text until the model writes a call's opening (the trigger), after which the call's name must be one
of the tools and its arguments must match that tool's JSON schema (xgrammar structural tags); with
"required" or a named tool the whole reply is calls. So a call that ends (finish_reason
"tool_calls") always parses and validates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .prompts import render
from .protocol import NamedToolChoice, ToolSpec, tool_call_id

TOOLS_SYSTEM_TEMPLATE = "tools.system.j2"


@dataclass(frozen=True)
class Dialect:
    name: str
    begin: Callable[[str], str]   # a call's opening, given the function's name
    end: str                      # a call's closing ("" = the reply ends with the call)
    trigger: Callable[[str], str]  # what, written in free text, starts a call
    one_call: bool                # the model makes one call a turn
    native: bool                  # the model's chat template lists the tools itself


GLM4 = Dialect("glm4", begin=lambda name: f"{name}\n", end="", trigger=lambda name: f"{name}\n", one_call=True,
               native=True)
TAGGED = Dialect("tagged", begin=lambda name: '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": ',
                 end="}\n</tool_call>", trigger=lambda name: "<tool_call>", one_call=False, native=False)
OPENAI = Dialect("openai", begin=TAGGED.begin, end=TAGGED.end, trigger=TAGGED.trigger, one_call=False, native=True)
DIALECTS = {d.name: d for d in (GLM4, TAGGED, OPENAI)}


def dialect_for(native: str | None) -> Dialect:
    """The engine's native dialect if it has one we know, else the tagged fallback."""
    return DIALECTS.get(native or "", TAGGED)


# ---------------------------------------------------------------- the prompt


def prompt_messages(messages: list[dict], tools: list[ToolSpec] | None, dialect: Dialect) -> list[dict]:
    """OpenAI messages (assistant `tool_calls`, `tool` results) in the form the dialect's prompt
    takes; `tools` (None: the request offers none) are shown to the model."""
    if dialect is OPENAI:
        return messages  # the server renders them with its own template
    if dialect is GLM4:
        return _glm4_messages(messages)  # the template lists the tools: see `with_tools`
    out = _tagged_messages(messages)
    if tools:
        listing = render(TOOLS_SYSTEM_TEMPLATE, tools=[t.function.model_dump(exclude_none=True) for t in tools])
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a template that lists tools itself. glm-4-9b-chat's template reads them from
    the first message that carries a `tools` key; glm-4-9b-chat-hf's from its `tools` argument,
    which the engine passes as well. Attached at encoding time, so dropping old turns to fit the
    context never drops the tools."""
    if not tools or not messages:
        return messages
    return [{**messages[0], "tools": tools}] + messages[1:]


def _glm4_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
            for call in m["tool_calls"]:
                # GLM-4 renders a call as <|assistant|>{name}\n{arguments}.
                out.append({"role": "assistant", "metadata": call["function"]["name"],
                            "content": call["function"]["arguments"]})
        elif m["role"] == "tool":
            out.append({"role": "observation", "content": m.get("content") or ""})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def _tagged_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(TAGGED.begin(c["function"]["name"]) + c["function"]["arguments"] + TAGGED.end
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


# ---------------------------------------------------------------- the grammar


def structural_tag(tools: list[ToolSpec], choice: Any, parallel: bool, dialect: Dialect) -> dict:
    """The xgrammar structural tag for a reply that may ("auto") or must ("required", a named tool)
    call the offered tools. For the `openai` dialect, the request's own fields, which the server
    enforces."""
    if dialect is OPENAI:
        return {"type": "openai_tools", "parallel_tool_calls": parallel,
                "tool_choice": choice.model_dump() if isinstance(choice, NamedToolChoice) else choice}
    offered = tools
    if isinstance(choice, NamedToolChoice):
        offered = [t for t in tools if t.function.name == choice.function.name]
    tags = [{"type": "tag", "begin": dialect.begin(t.function.name),
             # At most one space at a time: no runs of whitespace for a small model to loop in.
             "content": {"type": "json_schema", "json_schema": t.function.parameters, "max_whitespace_cnt": 1},
             "end": dialect.end} for t in offered]
    # A named tool is called once (OpenAI: "forces the model to call that function").
    single = dialect.one_call or not parallel or isinstance(choice, NamedToolChoice)
    if choice == "required" or isinstance(choice, NamedToolChoice):
        # The whole reply is calls: no free text a weak model could wander off into.
        fmt = ({"type": "or", "elements": tags} if single
               else {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True})
    else:
        triggers = list(dict.fromkeys(dialect.trigger(t.function.name) for t in offered))
        fmt = {"type": "triggered_tags", "triggers": triggers, "tags": tags, "stop_after_first": single}
    return {"type": "structural_tag", "format": fmt}


# ---------------------------------------------------------------- reading calls back


@dataclass
class Call:
    index: int
    id: str
    name: str
    arguments: str = ""
    closed: bool = False


@dataclass(frozen=True)
class Event:
    """What the parser found in new text: `text` for the reply's content, or a piece of call
    `call` (its first event has `starts` set, the following ones carry argument text)."""

    text: str = ""
    call: Call | None = None
    starts: bool = False


@dataclass
class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives. Text that could still turn
    out to be a call's opening is held back until it is decided."""

    names: list[str]
    dialect: Dialect
    calls: list[Call] = field(default_factory=list)
    _buffer: str = ""
    _current: Call | None = None

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._current is None:
                found = self._find_begin()
                if found is None:
                    keep = _held(self._buffer, [self.dialect.begin(n) for n in self.names])
                    out, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                    if out:
                        events.append(Event(text=out))
                    return events
                at, name = found
                if at:
                    events.append(Event(text=self._buffer[:at]))
                self._buffer = self._buffer[at + len(self.dialect.begin(name)):]
                self._current = Call(index=len(self.calls), id=tool_call_id(), name=name)
                self.calls.append(self._current)
                events.append(Event(call=self._current, starts=True))
                continue
            end = self.dialect.end
            if end and end in self._buffer:
                at = self._buffer.index(end)
                self._add_arguments(self._buffer[:at], events)
                self._buffer = self._buffer[at + len(end):]
                self._current.closed = True
                self._current = None
                continue
            keep = _held(self._buffer, [end]) if end else 0
            self._add_arguments(self._buffer[:len(self._buffer) - keep], events)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return events

    def finish(self, cut: bool = False) -> list[Event]:
        """The end of the reply: whatever was held back, and a call the reply ended inside. `cut`:
        max_tokens ended it, so held-back text that begins a call's opening is a call that never
        started, not content."""
        events: list[Event] = []
        if self._current is not None:
            self._add_arguments(self._buffer, events)
            # A dialect whose calls end with the reply (GLM-4) closes it here; one cut off by
            # max_tokens stays open (finish_reason "length").
            self._current.closed = not self.dialect.end and _is_json(self._current.arguments)
            self._current = None
        elif self._buffer and not cut:  # what is held back is always the start of an opening
            events.append(Event(text=self._buffer))
        self._buffer = ""
        return events

    def _find_begin(self) -> tuple[int, str] | None:
        best = None
        for name in self.names:
            at = self._buffer.find(self.dialect.begin(name))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, name)
        return best

    def _add_arguments(self, text: str, events: list[Event]) -> None:
        if text:
            self._current.arguments += text
            events.append(Event(text=text, call=self._current))


def _held(buffer: str, openings: list[str]) -> int:
    """How many characters at the end of `buffer` could be the start of one of `openings`."""
    longest = 0
    for opening in openings:
        for n in range(min(len(opening) - 1, len(buffer)), longest, -1):
            if opening.startswith(buffer[len(buffer) - n:]):
                longest = n
                break
    return longest


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def split_reply(text: str, names: list[str], dialect: Dialect, cut: bool = False) -> tuple[str, list[Call]]:
    """A whole reply as (content, calls); `cut`: max_tokens ended it."""
    parser = ToolCallParser(names, dialect)
    events = parser.feed(text) + parser.finish(cut)
    content = "".join(e.text for e in events if e.call is None)
    return content, parser.calls


def finish_reason(engine_reason: str, calls: list[Call]) -> str:
    """OpenAI's finish reason: "tool_calls" when the reply ended after complete calls."""
    if engine_reason == "stop" and calls and all(c.closed for c in calls):
        return "tool_calls"
    return engine_reason
