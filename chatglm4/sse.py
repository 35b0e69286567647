"""The one streaming format, used on both hops and by the page: OpenAI chunks as server-sent events.

The role comes first, then content deltas, then a chunk with the finish reason, an optional usage
chunk, an error frame if generation fails after the first byte, and always `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Iterable, Iterator, Protocol

from .errors import GenerationFailed, error_body
from .protocol import (ChatCompletionChunk, ChunkChoice, CompletionChoice, CompletionResponse, DeltaMessage,
                       FunctionCallDelta, ToolCallDelta, Usage)
from .toolcalls import Event, ToolCallParser, finish_reason

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MIMETYPE = "text/event-stream"


class StreamStep(Protocol):
    """What a stream yields (the engine's Delta), named here so this module needs no engine."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


def chat_chunks(pieces: Iterable[StreamStep], *, id: str, created: int, model: str,
                include_usage: bool, tools: ToolCallParser | None = None) -> Iterator[bytes]:
    """SSE frames for one streamed chat completion; with `tools`, calls the reply makes are sent
    as OpenAI's `tool_calls` deltas (the name first, then the arguments as they are generated)."""

    def chunk(delta: DeltaMessage, finish: str | None = None, usage: Usage | None = None,
              choices: bool = True) -> bytes:
        c = ChatCompletionChunk(id=id, created=created, model=model, usage=usage,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
        payload = c.model_dump()
        for choice in payload["choices"]:  # OpenAI omits unset delta fields rather than sending nulls
            choice["delta"] = delta.model_dump(exclude_none=True)
        return event(payload)

    yield chunk(DeltaMessage(role="assistant", content=""))
    last: StreamStep | None = None
    try:
        for piece in pieces:
            last = piece
            if not piece.text:
                continue
            if tools is None:
                yield chunk(DeltaMessage(content=piece.text))
            else:
                for delta in _deltas(tools.feed(piece.text)):
                    yield chunk(delta)
        finish = str((last and last.finish_reason) or "stop")
        if tools is not None:
            for delta in _deltas(tools.finish(cut=finish == "length")):
                yield chunk(delta)
        yield chunk(DeltaMessage(), finish=finish_reason(finish, tools.calls if tools else []))
        if include_usage:
            usage = Usage.of(last.prompt_tokens, last.completion_tokens) if last else Usage.of(0, 0)
            yield chunk(DeltaMessage(), usage=usage, choices=False)
    except GenerationFailed as exc:
        log.warning("stream failed after it started: %s", exc)
        yield event(error_body(f"generation failed: {exc}", "internal_error"))
    yield DONE


def completion_chunks(streams: list[Iterable[StreamStep]], *, id: str, created: int, model: str,
                      include_usage: bool, echo: list[str] | None = None) -> Iterator[bytes]:
    """SSE frames for a streamed /v1/completions: each prompt's text in turn (its `index` says which),
    its finish reason, then usage for all of them and `data: [DONE]`. The prompts are generated
    together; one read later simply waits in its stream."""

    def chunk(index: int, text: str, finish: str | None = None) -> bytes:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish)
        return event(CompletionResponse(id=id, created=created, model=model, choices=[choice]).model_dump(
            exclude={"usage"}))

    prompt_tokens = completion_tokens = 0
    try:
        for index, pieces in enumerate(streams):
            if echo:
                yield chunk(index, echo[index])
            last: StreamStep | None = None
            for piece in pieces:
                last = piece
                if piece.text:
                    yield chunk(index, piece.text)
            yield chunk(index, "", finish=str((last and last.finish_reason) or "stop"))
            if last is not None:
                prompt_tokens += last.prompt_tokens
                completion_tokens += last.completion_tokens
        if include_usage:
            usage = Usage.of(prompt_tokens, completion_tokens)
            yield event({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [],
                         "usage": usage.model_dump()})
    except GenerationFailed as exc:
        log.warning("stream failed after it started: %s", exc)
        yield event(error_body(f"generation failed: {exc}", "internal_error"))
    yield DONE


def _deltas(events: list[Event]) -> Iterator[DeltaMessage]:
    for e in events:
        if e.call is None:
            yield DeltaMessage(content=e.text)
        elif e.starts:
            yield DeltaMessage(tool_calls=[ToolCallDelta(index=e.call.index, id=e.call.id, type="function",
                                                         function=FunctionCallDelta(name=e.call.name, arguments=""))])
        else:
            yield DeltaMessage(tool_calls=[ToolCallDelta(index=e.call.index,
                                                         function=FunctionCallDelta(arguments=e.text))])
