"""The generation engine: a small interface (prompt ids in, an iterator of text pieces out) and its
local transformers implementation.

Streaming and whole answers are one code path: a non-streaming reply drains the same iterator. One
worker thread owns the model; callers enqueue requests and read events from their own stream, so
the HTTP threads never touch torch. The queue is bounded: past it, `EngineBusy` at once."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .detok import IncrementalDecoder, StopStrings
from .modelload import LoadedModel
from .sampling import SamplingParams, next_token

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """Too many requests are waiting already."""


class EngineError(RuntimeError):
    """Generation failed inside the engine."""


@dataclass
class Piece:
    """One step of a stream: new text, and at the end the finish reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


_END = object()


class GenerationStream:
    """Iterator of `Piece`s for one request; `cancel()` frees the engine within one step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    # engine side
    def _put(self, item: Any) -> None:
        self._events.put(item)

    # caller side
    def __iter__(self) -> Iterator[Piece]:
        while True:
            item = self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise EngineError(str(item)) from item
            yield item
            if item.finish_reason is not None:
                return

    def collect(self) -> Piece:
        """Drains the stream into one Piece holding the whole text."""
        texts, last = [], Piece("")
        for piece in self:
            texts.append(piece.text)
            last = piece
        return Piece("".join(texts), last.finish_reason, last.prompt_tokens, last.completion_tokens)


class LocalEngine:
    """transformers model + tokenizer behind one worker thread."""

    def __init__(self, loaded: LoadedModel, max_waiting: int = 64):
        self.loaded = loaded
        self.name = loaded.name
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer
        self._queue: queue.Queue[GenerationStream | None] = queue.Queue(maxsize=max_waiting)
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._grammar = None
        self.running = 0
        self.tokens_generated = 0
        self._worker.start()

    # ------------------------------------------------------------ interface

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def compile_json_schema(self, schema: dict) -> Any:
        """A compiled grammar that only admits JSON matching `schema` (cached by schema text)."""
        from .constrain import GrammarCache

        if self._grammar is None:
            self._grammar = GrammarCache(self.tokenizer, self.loaded.model.config, self.loaded.stop_token_ids)
        return self._grammar.compile(schema)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        stream = GenerationStream(prompt_ids, params)
        try:
            self._queue.put_nowait(stream)
        except queue.Full:
            raise EngineBusy("the model server's queue is full; retry shortly") from None
        return stream

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def shutdown(self) -> None:
        self._queue.put(None)

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        import torch

        while True:
            stream = self._queue.get()
            if stream is None:
                return
            if stream.cancelled.is_set():
                stream._put(_END)
                continue
            self.running = 1
            try:
                with torch.inference_mode():
                    self._generate_one(stream)
            except Exception as exc:  # the worker's edge: one bad request must not kill the engine
                log.exception("generation failed")
                stream._put(exc)
            finally:
                self.running = 0

    def _generate_one(self, stream: GenerationStream) -> None:
        import torch

        params = stream.params
        model, device = self.loaded.model, self.loaded.input_device
        stop_ids = set(self.loaded.stop_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        matcher = bitmask = None
        if params.grammar is not None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(params.grammar)
            bitmask = xgr.allocate_token_bitmask(1, self._grammar.vocab_size)

        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopStrings(params.stop)
        n_prompt = len(stream.prompt_ids)
        budget = min(params.max_tokens, self.context_length - n_prompt)
        inputs = torch.tensor([stream.prompt_ids], device=device)
        past = None
        generated = 0
        finish = "length"
        hit = False
        while generated < budget:
            if stream.cancelled.is_set():
                finish = "cancelled"
                break
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1, :].float().cpu()  # [vocab]
            if matcher is not None:
                matcher.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)
            elif params.ignore_eos or generated < params.min_tokens:
                for i in stop_ids:
                    logits[i] = float("-inf")
            token = next_token(logits, params, generator)
            generated += 1
            self.tokens_generated += 1
            if stream.first_token_at is None:
                stream.first_token_at = time.monotonic()
            if matcher is not None and not matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected token {token}")
            if token in stop_ids and not params.ignore_eos:
                finish = "stop"
                break
            text, hit = stops.feed(decoder.push(token))
            if text:
                stream._put(Piece(text, None, n_prompt, generated))
            if hit:
                finish = "stop"
                break
            if matcher is not None and matcher.is_terminated():
                finish = "stop"
                break
            inputs = torch.tensor([[token]], device=device)
        tail = ""
        if not hit:  # text after a stop string is dropped; otherwise release what was held back
            tail, _ = stops.feed(decoder.flush())
            tail += stops.flush()
        stream._put(Piece(tail, finish, n_prompt, generated))
