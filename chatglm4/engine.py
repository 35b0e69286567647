"""The generation engine: a small interface (prompt ids in, an iterator of text pieces out) and its
local transformers implementation.

Streaming and whole answers are one code path: a non-streaming reply drains the same iterator. One
scheduler thread owns the model and batches the requests; callers enqueue requests and read events
from their own stream, so the HTTP threads never touch torch. The queue is bounded: past it,
`EngineBusy` at once."""

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

    # How often a waiting reader checks whether its client is still there.
    POLL_S = 0.25

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        # Set by the server: a callable that says the HTTP client has gone away.
        self.client_gone: Any = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def abandoned(self) -> bool:
        """Cancelled, or its client has gone away (checked by the scheduler every step)."""
        if not self.cancelled.is_set() and self.client_gone is not None and self.client_gone():
            self.cancelled.set()
        return self.cancelled.is_set()

    # engine side
    def _put(self, item: Any) -> None:
        self._events.put(item)

    # caller side
    def __iter__(self) -> Iterator[Piece]:
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


class _Sequence:
    """One request's decoding state inside the running batch."""

    def __init__(self, stream: GenerationStream, tokenizer: Any):
        import torch

        self.stream = stream
        self.params = stream.params
        self.n_prompt = len(stream.prompt_ids)
        self.generated = 0
        self.last_token = -1
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(self.params.stop)
        self.generator = (torch.Generator(device="cpu").manual_seed(self.params.seed)
                          if self.params.seed is not None else None)
        self.emitted = False
        self.matcher = None
        if self.params.grammar is not None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.params.grammar)


class LocalEngine:
    """transformers model + tokenizer behind one scheduler thread that batches concurrent requests.

    Between decode steps the scheduler admits waiting requests (one batched prefill), then runs one
    forward pass for every running sequence; finished or cancelled sequences leave at once. Sampling,
    stop conditions and grammars stay per request."""

    def __init__(self, loaded: LoadedModel, max_waiting: int = 64, max_batch: int = 32,
                 prefill_token_budget: int = 8192, prefix_cache_tokens: int = 8192):
        from .prefixcache import PrefixCache

        self.loaded = loaded
        self.name = loaded.name
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer
        self.max_batch = max_batch
        self.prefill_token_budget = prefill_token_budget
        self._queue: queue.Queue[GenerationStream | None] = queue.Queue(maxsize=max_waiting)
        self._grammar = None
        self._grammar_lock = threading.Lock()
        self.prefixes = PrefixCache(prefix_cache_tokens)
        # Called with each request's time to first token (seconds), e.g. by a metrics histogram.
        self.observe_ttft: Any = None
        self.running = 0
        self.tokens_generated = 0
        self.prefill_tokens = 0
        self.steps = 0
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ interface

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def compile_json_schema(self, schema: dict) -> Any:
        """A compiled grammar that only admits JSON matching `schema` (cached by schema text)."""
        return self._grammars().compile(schema)

    def _grammars(self) -> Any:
        with self._grammar_lock:
            if self._grammar is None:
                from .constrain import GrammarCache

                self._grammar = GrammarCache(self.tokenizer, self.loaded.model.config, self.loaded.stop_token_ids)
            return self._grammar

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        if not prompt_ids:
            raise ValueError("empty prompt")
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
        self._stopping = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    # ------------------------------------------------------------ scheduler

    def _run(self) -> None:
        import torch

        from .batchkv import BatchKV

        self._cache = BatchKV()
        self._batch: list[_Sequence] = []
        while not self._stopping:
            admitted: list[_Sequence] = []
            try:
                admitted = self._admit(block=not self._batch)
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    if self._batch:
                        self._decode_step()
            except Exception as exc:  # the scheduler's edge: fail the batch, keep serving
                log.exception("generation failed")
                for seq in self._batch + [s for s in admitted if s not in self._batch]:
                    seq.stream._put(exc)
                self._batch = []
                self._cache = BatchKV()
            self.running = len(self._batch)

    def _admit(self, block: bool) -> list[_Sequence]:
        """Waiting requests that fit the batch and the prefill budget (waits for one when idle)."""
        admitted: list[_Sequence] = []
        budget = self.prefill_token_budget
        while len(self._batch) + len(admitted) < self.max_batch:
            try:
                stream = self._queue.get(block=block and not admitted)
            except queue.Empty:
                break
            if stream is None:
                break
            if stream.abandoned():
                stream._put(_END)
                continue
            admitted.append(_Sequence(stream, self.tokenizer))
            budget -= len(stream.prompt_ids)
            if budget <= 0:
                break
        self.running = len(self._batch) + len(admitted)
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Computes the new prompts' caches (reusing cached prefixes), adds them to the batch, emits
        their first tokens."""
        # Prompts whose cached prefixes have the same length (typically one shared system prompt;
        # 0 = nothing cached) share one forward over their remaining tokens.
        groups: dict[int, list[tuple[_Sequence, list[tuple[Any, Any]] | None]]] = {}
        for seq in seqs:
            n, prefix = self.prefixes.longest(seq.stream.prompt_ids)
            groups.setdefault(n, []).append((seq, prefix))
        for n, group in groups.items():
            self._prefill_rows(n, group)

    def _prefill_rows(self, n: int, group: list[tuple[_Sequence, list[tuple[Any, Any]] | None]]) -> None:
        """Prefills prompts whose first n tokens are cached (n = 0: none): their remaining tokens are
        right-padded into one batch; the cached prefixes seed the cache."""
        import torch
        from transformers import DynamicCache

        device = self.loaded.input_device
        seqs = [seq for seq, _ in group]
        lengths = [len(s.stream.prompt_ids) for s in seqs]
        width = max(lengths) - n
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n + width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :lengths[i] - n] = torch.tensor(s.stream.prompt_ids[n:])
            mask[i, :lengths[i]] = 1
        cache = DynamicCache(config=self.loaded.model.config)
        if n:
            prefixes = [prefix for _, prefix in group]
            for layer_idx in range(len(prefixes[0])):
                cache.update(torch.cat([p[layer_idx][0] for p in prefixes]),
                             torch.cat([p[layer_idx][1] for p in prefixes]), layer_idx)
        out = self.loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=torch.arange(n, n + width, device=device)[None, :].expand(len(seqs), -1),
                                past_key_values=cache, use_cache=True)
        self.prefill_tokens += sum(lengths) - n * len(seqs)
        last = torch.tensor([length - n - 1 for length in lengths])
        logits = out.logits[torch.arange(len(seqs)), last.to(out.logits.device), :].float().cpu()  # [rows, vocab]
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for i, s in enumerate(seqs):
            self.prefixes.store(s.stream.prompt_ids, layers, i)
        self._join(seqs, layers, lengths, logits)

    def _join(self, seqs: list[_Sequence], layers: list[tuple[Any, Any]], lengths: list[int], logits: Any) -> None:
        self._cache.add(layers, lengths)
        self._batch.extend(seqs)
        self._sample_and_emit(logits, first=len(self._batch) - len(seqs))

    def _decode_step(self) -> None:
        """One forward pass for every running sequence."""
        import torch

        model, device = self.loaded.model, self.loaded.input_device
        self._cache.reserve(1)
        tokens = torch.tensor([[s.last_token] for s in self._batch], device=device)
        mask = self._cache.decode_mask(model.config._attn_implementation, model.dtype, device)
        out = model(input_ids=tokens, attention_mask=mask, position_ids=self._cache.positions(device),
                    past_key_values=self._cache, use_cache=True)
        self._cache.lengths += 1
        self.steps += 1
        self._sample_and_emit(out.logits[:, -1, :].float().cpu(), first=0)

    def _sample_and_emit(self, logits: Any, first: int) -> None:
        """Chooses the next token of batch rows first.. from logits rows 0..; retires finished rows."""
        import torch

        rows = self._batch[first:]
        stop_ids = self.loaded.stop_token_ids
        constrained = [i for i, s in enumerate(rows) if s.matcher is not None]
        if constrained:
            import xgrammar as xgr

            bitmask = xgr.allocate_token_bitmask(len(rows), self._grammar.vocab_size)
            for i in constrained:
                rows[i].matcher.fill_next_token_bitmask(bitmask, i)
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=constrained)
        for i, seq in enumerate(rows):
            if seq.matcher is None and (seq.params.ignore_eos or seq.generated < seq.params.min_tokens):
                logits[i, stop_ids] = float("-inf")
        greedy = torch.argmax(logits, dim=-1).tolist()
        finished = set()
        for i, seq in enumerate(rows):
            token = greedy[i] if seq.params.temperature <= 0 else next_token(logits[i], seq.params, seq.generator)
            if self._accept(seq, token):
                finished.add(first + i)
        if finished or any(s.stream.abandoned() for s in self._batch):
            keep = []
            for r, seq in enumerate(self._batch):
                if r in finished:
                    continue
                if seq.stream.cancelled.is_set():
                    seq.stream._put(Piece("", "cancelled", seq.n_prompt, seq.generated))
                    continue
                keep.append(r)
            self._batch = [self._batch[r] for r in keep]
            self._cache.keep(keep)

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Records one generated token for `seq`, emits its text; True when the sequence is done."""
        seq.generated += 1
        self.tokens_generated += 1
        seq.last_token = token
        stream, params = seq.stream, seq.params
        if stream.first_token_at is None:
            stream.first_token_at = time.monotonic()
            if self.observe_ttft is not None:
                self.observe_ttft(stream.first_token_at - stream.submitted_at)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected token {token}")
        finish, hit = None, False
        if token in self.loaded.stop_token_ids and not params.ignore_eos:
            finish = "stop"
        else:
            piece = seq.decoder.push(token)
            if not seq.emitted and self.loaded.strip_leading_newline:
                piece = piece.lstrip("\n")
            text, hit = seq.stops.feed(piece)
            if text:
                seq.emitted = True
                stream._put(Piece(text, None, seq.n_prompt, seq.generated))
            if hit or (seq.matcher is not None and seq.matcher.is_terminated()):
                finish = "stop"
            elif seq.generated >= params.max_tokens or seq.n_prompt + seq.generated >= self.context_length:
                finish = "length"
        if finish is None:
            return False
        tail = ""
        if not hit:  # text after a stop string is dropped; otherwise release what was held back
            tail, _ = seq.stops.feed(seq.decoder.flush())
            tail += seq.stops.flush()
        stream._put(Piece(tail, finish, seq.n_prompt, seq.generated))
        return True
