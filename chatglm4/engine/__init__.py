"""The generation engine's interface: prompt ids in, a stream of text deltas out.

This package is the only place that imports torch, transformers or xgrammar, and this module imports
none of them: the servers and the kernel program against `Engine`, which the local transformers
engine (`scheduler.LocalEngine`) implements and a remote OpenAI-compatible engine can implement too.

Streaming and whole answers are one code path: a non-streaming reply drains the same stream into a
`Completion`."""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from ..errors import GenerationFailed
from .constrain import SchemaError
from .sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "EngineBusy", "EngineError", "EngineStats", "FinishReason",
           "GenerationStream", "SamplingParams", "SchemaError"]


class EngineBusy(Exception):
    """The engine cannot take this request now (queue full, or shutting down); retry shortly."""


class EngineError(GenerationFailed):
    """Generation failed inside the engine."""


class FinishReason(str, enum.Enum):
    """Why a sequence ended; the values are the OpenAI protocol's (plus our own `cancelled`)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Delta:
    """One step of a stream: new text, and on the last step the finish reason. Token counts are
    running totals."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # When asked for: (token id, log-probability, [(id, log-probability) of the most likely]) of
    # each token generated since the previous delta.
    logprobs: tuple | None = None


@dataclass(frozen=True)
class Completion:
    """A whole generation: every delta's text joined, with the final counts."""

    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None = None


@dataclass(frozen=True)
class EngineStats:
    """The engine's gauges and counters, read by /health and /metrics."""

    waiting: int = 0
    running: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    prefix_hit_tokens: int = 0
    steps: int = 0
    prefill_chunks: int = 0  # forwards that computed part of a long prompt (chunked prefill)
    kv_cache_usage: float = 0.0  # share of the batch cache's token budget the running rows occupy, 0..1
    kv_cache_bytes: int = 0  # memory the batch cache's buffers hold (allocated once, then reused)


_END = object()


class GenerationStream:
    """Iterator of `Delta`s for one request; `cancel()` frees the engine within one step."""

    # How often a waiting reader checks whether its client is still there.
    POLL_S = 0.25

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        # Set by the server: a callable that says the HTTP client has gone away.
        self.client_gone: Callable[[], bool] | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def abandoned(self) -> bool:
        """Cancelled, or its client has gone away (checked by the scheduler every step)."""
        if not self.cancelled.is_set() and self.client_gone is not None and self.client_gone():
            self.cancelled.set()
        return self.cancelled.is_set()

    # ------------------------------------------------------------ engine side

    def put(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.done = True
        self._events.put(delta)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with an error its reader raises as EngineError."""
        self.done = True
        self._events.put(error)

    def end(self) -> None:
        """Ends the stream without a final delta (a request dropped before it started)."""
        self.done = True
        self._events.put(_END)

    # ------------------------------------------------------------ caller side

    def __iter__(self) -> Iterator[Delta]:
        while True:
            try:
                item = self._events.get(timeout=self.POLL_S)
            except queue.Empty:
                if self.client_gone is not None and self.client_gone():
                    self.cancel()
                    return
                continue
            if item is _END:
                return
            if isinstance(item, EngineError):
                raise item
            if isinstance(item, BaseException):
                raise EngineError(str(item)) from item
            yield item
            if item.finish_reason is not None:
                return

    def collect(self) -> Completion:
        """Drains the stream into one Completion."""
        texts, last, logprobs = [], Delta(""), []
        for delta in self:
            texts.append(delta.text)
            logprobs.extend(delta.logprobs or ())
            last = delta
        return Completion("".join(texts), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          logprobs if self.params.logprobs is not None else None)


class Engine(Protocol):
    """What the kernel and the model server need from a generation engine."""

    context_length: int
    # How the model writes tool calls natively ("glm4"), or None (chatglm4/toolcalls.py).
    tool_dialect: str | None
    # Sampling values the model declares (temperature, top_p, repetition_penalty): engine/gendefaults.py
    generation_defaults: dict[str, float]

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready for a reply;
        `tools` are handed to a template that lists them itself."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text, for /v1/completions."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Starts generating; EngineBusy when it cannot take the request now."""

    def compile_json_schema(self, schema: dict) -> Any:
        """A compiled grammar admitting only JSON that matches `schema`; SchemaError if it cannot."""

    def compile_structural_tag(self, tag: dict) -> Any:
        """A compiled grammar from an xgrammar structural tag (tool calls); SchemaError if it cannot."""

    def stats(self) -> EngineStats:
        """Current gauges and counters."""

    def shutdown(self) -> None:
        """Stops the engine; every open stream ends with EngineError."""
