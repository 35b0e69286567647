"""The one streaming format, used on both hops and by the page: OpenAI chunks as server-sent events.

The role comes first, then content deltas, then a chunk with the finish reason, an optional usage
chunk, an error frame if generation fails after the first byte, and always `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Iterable, Iterator, Protocol

from .errors import GenerationFailed, error_body
from .protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage, Usage

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
                include_usage: bool) -> Iterator[bytes]:
    """SSE frames for one streamed chat completion."""

    def chunk(delta: DeltaMessage, finish: str | None = None, usage: Usage | None = None,
              choices: bool = True) -> bytes:
        c = ChatCompletionChunk(id=id, created=created, model=model, usage=usage,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
        payload = c.model_dump()
        for choice in payload["choices"]:  # OpenAI omits unset delta fields rather than sending nulls
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return event(payload)

    yield chunk(DeltaMessage(role="assistant", content=""))
    last: StreamStep | None = None
    try:
        for piece in pieces:
            last = piece
            if piece.text:
                yield chunk(DeltaMessage(content=piece.text))
        yield chunk(DeltaMessage(), finish=(last and last.finish_reason) or "stop")
        if include_usage:
            usage = Usage.of(last.prompt_tokens, last.completion_tokens) if last else Usage.of(0, 0)
            yield chunk(DeltaMessage(), usage=usage, choices=False)
    except GenerationFailed as exc:
        log.warning("stream failed after it started: %s", exc)
        yield event(error_body(f"generation failed: {exc}", "internal_error"))
    yield DONE
