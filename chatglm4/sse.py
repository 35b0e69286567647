"""The one streaming format, used on both hops and by the page: OpenAI chunks as server-sent events.

The role comes first, then content deltas, then a chunk with the finish reason, an optional usage
chunk, an error frame if generation fails after the first byte, and always `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Iterator, Protocol

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
    logprobs: tuple | None


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


def chat_chunks(choices: list[Iterable[StreamStep]], *, id: str, created: int, model: str,
                include_usage: bool, tools: Callable[[], ToolCallParser | None] | None = None,
                logprobs: Callable[[list], Any] | None = None) -> Iterator[bytes]:
    """SSE frames for one streamed chat completion of one or more choices (generated together; each
    sent whole in turn, its chunks carrying its `index`). With `tools` (a parser per choice), calls
    a reply makes are sent as OpenAI's `tool_calls` deltas (the name first, then the arguments as
    they are generated); with `logprobs`, each token's log-probabilities ride on the chunks."""

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None, usage: Usage | None = None,
              lp: Any = None) -> bytes:
        c = ChatCompletionChunk(id=id, created=created, model=model, usage=usage,
                                choices=[] if usage else [ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                                      logprobs=lp)])
        payload = c.model_dump()
        for choice in payload["choices"]:  # OpenAI omits unset delta fields rather than sending nulls
            choice["delta"] = delta.model_dump(exclude_none=True)
        return event(payload)

    prompt_tokens = completion_tokens = 0
    try:
        for index, pieces in enumerate(choices):
            parser = tools() if tools else None
            yield chunk(index, DeltaMessage(role="assistant", content=""))
            last: StreamStep | None = None
            for piece in pieces:
                last = piece
                lp = logprobs(list(piece.logprobs)) if logprobs and piece.logprobs else None
                if not piece.text and lp is None:
                    continue
                if parser is None:
                    yield chunk(index, DeltaMessage(content=piece.text), lp=lp)
                else:
                    for delta in _deltas(parser.feed(piece.text)):
                        yield chunk(index, delta)
            finish = str((last and last.finish_reason) or "stop")
            if parser is not None:
                for delta in _deltas(parser.finish(cut=finish == "length")):
                    yield chunk(index, delta)
            yield chunk(index, DeltaMessage(), finish=finish_reason(finish, parser.calls if parser else []))
            if last is not None:
                prompt_tokens = last.prompt_tokens
                completion_tokens += last.completion_tokens
        if include_usage:
            yield chunk(0, DeltaMessage(), usage=Usage.of(prompt_tokens, completion_tokens))
    except GenerationFailed as exc:
        log.warning("stream failed after it started: %s", exc)
        yield event(error_body(f"generation failed: {exc}", "internal_error"))
    yield DONE


def completion_chunks(streams: list[Iterable[StreamStep]], *, id: str, created: int, model: str,
                      include_usage: bool, echo: list[str] | None = None, n: int = 1) -> Iterator[bytes]:
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
            if echo:  # choices come n per prompt
                yield chunk(index, echo[index // n])
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
