"""The local engine: a transformers model behind one scheduler thread that batches requests.

One scheduler thread owns the model; callers enqueue requests and read deltas from their own stream,
so the HTTP threads never touch torch. The queue is bounded: past it, `EngineBusy` at once.

Each step of the loop reads like vLLM's: admit waiting requests, run at most a chunk of prefill,
run one decode forward for every running sequence, sample, decide with `check_stop` which sequences
ended, and `_retire` the finished and cancelled rows.

While streams are decoding, prefill keeps to a per-step token budget (chunked prefill, vLLM's
default): admitted prompts are taken in arrival order; those that fit whole are prefilled together in
one batched forward, and the first that does not fit gets the rest of the budget as a chunk, its
partial cache kept (`PromptKV`) until the next step. So a long prompt pauses the decoding streams by
one chunk per step, not by its whole prefill, and joins the batch the step after its last. The budget
is `prefill_chunk_tokens`, or fewer where the forwards timed so far say those would take longer than
`prefill_chunk_seconds` (`pacing.ChunkPacer`): deep into a long prompt, or on a slow machine. With no
stream decoding there is nobody to pause: prompts are prefilled whole, as fast as they can be."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any

from . import Delta, EngineBusy, EngineError, EngineStats, FinishReason, GenerationStream
from .detok import IncrementalDecoder, StopStrings
from . import gendefaults, heap
from .logits import LogitsAdjuster, needs_adjusting, top_logprobs
from .modelload import EMBEDDED_NAME, LoadedModel
from .sampling import SamplingParams, next_token

log = logging.getLogger(__name__)


# Below this a temperature divides logits into infinities: such requests are decoded greedily.
GREEDY_BELOW = 1e-5

# Prompt tokens prefilled per engine step while other streams decode. Each step then costs a chunk's
# forward plus the decode forward: on 2 CPU cores with SmolLM2-135M a 64-token chunk takes 0.12 s at
# the start of a 2,800-token prompt and 0.4 s at its end, a 4-row decode step 0.06-0.1 s, so the
# streams pause at most about 0.5 s a step instead of once for the whole prefill (8-19 s), and the
# prompt itself takes about twice as long to its first token (bench/prefill_gap.py). Smaller chunks
# pause less but pay each forward's fixed cost more often; on a GPU, where that cost is small, use
# hundreds.
PREFILL_CHUNK_TOKENS = 64
# ... unless fewer tokens fill this many seconds: further into a long prompt each token costs more
# (attention over all before it), so chunks shrink to keep each step's pause (`pacing.ChunkPacer`).
PREFILL_CHUNK_SECONDS = 0.25


def check_stop(*, end_token: bool, stop_string: bool, grammar_done: bool, generated: int, max_tokens: int,
               total_tokens: int, context_length: int) -> FinishReason | None:
    """Whether a sequence ends after its newest token, and why; None while it goes on."""
    if end_token or stop_string or grammar_done:
        return FinishReason.STOP
    if generated >= max_tokens or total_tokens >= context_length:
        return FinishReason.LENGTH
    return None


class _Sequence:
    """One request's state: its prompt's prefill, then its decoding inside the running batch."""

    def __init__(self, stream: GenerationStream, tokenizer: Any):
        import torch

        self.stream = stream
        self.params = stream.params
        self.n_prompt = len(stream.prompt_ids)
        # Prompt positions whose keys and values exist: a cached prefix (`prefix`, until the prefill
        # starts), then the chunks computed so far (`kv`, while the prompt is prefilled in chunks).
        self.computed = 0
        self.prefix: list[tuple[Any, Any]] | None = None
        self.kv: Any = None
        self.last_logits: Any = None  # of the last chunk, until the sequence joins the batch
        self.generated = 0
        self.last_token = -1
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(self.params.stop)
        self.generator = (torch.Generator(device="cpu").manual_seed(self.params.seed)
                          if self.params.seed is not None else None)
        self.greedy = self.params.temperature < GREEDY_BELOW
        self.emitted = False
        self.matcher = None
        if self.params.grammar is not None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.params.grammar)
        # The most positions this sequence can occupy in the batch's cache: admission keeps rows ×
        # the widest reach within the cache's budget, so no running sequence ever runs out of room.
        self.reach = self.n_prompt + self.params.max_tokens + 1
        self.adjuster = LogitsAdjuster(self.params, stream.prompt_ids) if needs_adjusting(self.params) else None
        # (token, its log-probability, the most likely tokens) for the tokens not yet in a delta.
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []

    def delta(self, text: str, finish: FinishReason | None = None) -> Delta:
        logprobs, self.logprobs = (tuple(self.logprobs) if self.logprobs else None), []
        return Delta(text, finish, self.n_prompt, self.generated, logprobs)


class LocalEngine:
    """transformers model + tokenizer behind one scheduler thread that batches concurrent requests.

    Sampling, stop conditions and grammars stay per request, and so do their failures: a request
    whose own state breaks (its seed, sampling, grammar) fails alone while the batch goes on."""

    def __init__(self, loaded: LoadedModel, max_waiting: int = 64, max_batch: int = 32,
                 prefill_token_budget: int = 8192, prefix_cache_tokens: int = 8192,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, kv_cache_tokens: int = 0,
                 prefill_chunk_seconds: float = PREFILL_CHUNK_SECONDS, compile_decode: bool = False):
        from . import compiled
        from .batchkv import BatchKV
        from .pacing import ChunkPacer
        from .prefixcache import PrefixCache

        if prefill_chunk_tokens < 0:
            raise ValueError("prefill_chunk_tokens must be 0 (whole prompts) or positive")
        if prefill_chunk_seconds < 0:
            raise ValueError("prefill_chunk_seconds must be 0 (chunks of prefill_chunk_tokens) or positive")
        self.loaded = loaded
        # What a decode step calls: the model, or the model compiled for decode steps (warmed up here,
        # before the engine takes requests, so no request waits for a compile).
        self._decode = loaded.model
        if compile_decode:
            self._decode = compiled.compile_decode(loaded.model)
            compiled.warm_up(loaded.model, self._decode, loaded.input_device)
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer
        # GLM-4 ends a tool call's turn with <|observation|>, a token of its own vocabulary.
        self.tool_dialect = "glm4" if "<|observation|>" in loaded.tokenizer.get_vocab() else None
        self.generation_defaults = gendefaults.from_model(loaded.model, loaded.name == EMBEDDED_NAME)
        self.max_batch = max_batch
        # Unchunked (0): every admitted prompt is prefilled whole, at most this many tokens a step.
        self.prefill_token_budget = prefill_token_budget
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # Times every prefill forward and sizes chunks by it (None: every chunk prefill_chunk_tokens).
        self._pacer = (ChunkPacer(prefill_chunk_seconds, prefill_chunk_tokens)
                       if prefill_chunk_tokens and prefill_chunk_seconds else None)
        self._queue: queue.Queue[GenerationStream | None] = queue.Queue(maxsize=max_waiting)
        self._grammar = None
        self._grammar_lock = threading.Lock()
        self._prefixes = PrefixCache(prefix_cache_tokens)
        # Called with each request's time to first token (seconds), e.g. by a metrics histogram.
        self.observe_ttft: Any = None
        # rows × width of the batch's cache (0 = the larger of the context and 65,536 tokens). An idle
        # engine admits one request whatever its reach, so a small budget limits concurrency, not length.
        self.kv_cache_tokens = kv_cache_tokens or max(65536, self.context_length + 1)
        self._cache = BatchKV(max_slots=max_batch, max_tokens=self.kv_cache_tokens)
        self._batch: list[_Sequence] = []
        # A request admitted but waiting for room in the cache: first in line at the next admission.
        self._held: _Sequence | None = None
        # Admitted, in arrival order, and not yet in the batch: their prompts are being prefilled.
        self._pending: list[_Sequence] = []
        self._running = 0
        self._tokens_generated = 0
        self._prefill_tokens = 0
        self._prefill_chunks = 0
        self._steps = 0
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ interface

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (the tokenizer's own special tokens, such as BOS, included)."""
        return self.tokenizer(text)["input_ids"]

    def compile_json_schema(self, schema: dict) -> Any:
        """A compiled grammar that only admits JSON matching `schema` (cached by schema text)."""
        return self._grammars().compile(schema)

    def compile_structural_tag(self, tag: dict) -> Any:
        """A compiled grammar from an xgrammar structural tag (cached by its text)."""
        return self._grammars().compile_structural_tag(tag)

    def _grammars(self) -> Any:
        with self._grammar_lock:
            if self._grammar is None:
                from .constrain import GrammarCache

                self._grammar = GrammarCache(self.tokenizer, self.loaded.model.config, self.loaded.stop_token_ids)
            return self._grammar

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if self._stopping.is_set():
            raise EngineBusy("the model server is shutting down")
        stream = GenerationStream(prompt_ids, params)
        try:
            self._queue.put_nowait(stream)
        except queue.Full:
            raise EngineBusy("the model server's queue is full; retry shortly") from None
        return stream

    def stats(self) -> EngineStats:
        cache = self._cache  # read from another thread: one consistent object
        return EngineStats(waiting=self._queue.qsize() + (self._held is not None), running=self._running,
                           tokens_generated=self._tokens_generated, prefill_tokens=self._prefill_tokens,
                           prefix_hit_tokens=self._prefixes.hit_tokens, steps=self._steps,
                           prefill_chunks=self._prefill_chunks,
                           kv_cache_usage=min(1.0, cache.rows * cache.width / self.kv_cache_tokens),
                           kv_cache_bytes=cache.nbytes())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the scheduler; every stream still open (running or waiting) ends with EngineError."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # wakes an idle scheduler
        except queue.Full:
            pass
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("engine did not stop within %.0f s; failing its streams anyway", timeout)
            self._fail_all(EngineError("the model server is shutting down"))

    # ------------------------------------------------------------ scheduler

    def _run(self) -> None:
        import torch

        trimmed_at = 0  # tokens generated when the heap was last trimmed
        while not self._stopping.is_set():
            idle = not self._batch and not self._pending
            try:
                if idle and self._tokens_generated != trimmed_at and self._queue.empty():
                    heap.trim()  # about to wait for work: give what the last burst freed back to the OS
                    trimmed_at = self._tokens_generated
                self._admit(block=idle)
                with torch.inference_mode():
                    if self._pending:
                        self._prefill_step()
                    if self._batch:
                        self._decode_step()
            except Exception as exc:  # a failure of the shared step: fail the batch, keep serving
                log.exception("generation step failed")
                failed = self._batch + [s for s in self._pending if s not in self._batch]
                self._reset_batch()
                for seq in failed:
                    seq.stream.fail(EngineError(f"generation failed: {exc}"))
            self._running = len(self._batch) + len(self._pending)
        self._fail_all(EngineError("the model server is shutting down"))

    def _reset_batch(self) -> None:
        from .batchkv import BatchKV

        self._batch = []
        self._pending = []
        self._cache = BatchKV(max_slots=self.max_batch, max_tokens=self.kv_cache_tokens)

    def _fail_all(self, error: EngineError) -> None:
        """Ends every running and waiting stream with `error`."""
        held, self._held = ([self._held] if self._held is not None else []), None
        for seq in self._batch + self._pending + held:
            if not seq.stream.done:
                seq.stream.fail(error)
        while True:
            try:
                stream = self._queue.get_nowait()
            except queue.Empty:
                break
            if stream is not None and not stream.done:
                stream.fail(error)

    def _admit(self, block: bool) -> None:
        """Moves waiting requests to `_pending` while the batch has room (slots and cache) and this
        step's prefill budget has tokens left over from the prompts already pending (waits for one
        when idle)."""
        admitted: list[_Sequence] = []
        budget = (self._step_budget(self.prefill_token_budget, waiting=self._waiting())
                  - sum(s.n_prompt - s.computed for s in self._pending))
        while len(self._batch) + len(self._pending) + len(admitted) < self.max_batch and budget > 0:
            seq = self._next_waiting(block=block and not admitted)
            if seq is None:
                break
            if not self._fits(seq, admitted):
                self._held = seq  # its turn comes when running sequences have finished
                break
            seq.computed, seq.prefix = self._prefixes.longest(seq.stream.prompt_ids)
            admitted.append(seq)
            budget -= seq.n_prompt - seq.computed
        self._pending.extend(admitted)
        self._running = len(self._batch) + len(self._pending)

    def _next_waiting(self, block: bool) -> _Sequence | None:
        """The held request, else the next one in the queue that is still wanted and can start."""
        if self._held is not None:
            seq, self._held = self._held, None
            if not seq.stream.abandoned():
                return seq
            seq.stream.end()
        while True:
            try:
                stream = self._queue.get(block=block)
            except queue.Empty:
                return None
            if stream is None:
                return None
            if stream.abandoned():
                stream.end()
                continue
            try:
                return _Sequence(stream, self.tokenizer)
            except Exception as exc:  # this request's own state (seed, grammar) is unusable
                log.warning("request refused at admission: %s", exc)
                stream.fail(EngineError(f"cannot start this request: {exc}"))

    def _fits(self, seq: _Sequence, admitted: list[_Sequence]) -> bool:
        """Whether the cache's budget holds `seq` beside the running, pending and admitted sequences,
        each at its reach (an empty engine takes any request)."""
        from .batchkv import round_up

        others = [*self._batch, *self._pending, *admitted]
        if not others:
            return True
        widest = min(max(s.reach for s in [*others, seq]), self.context_length + 1)
        return (len(others) + 1) * round_up(widest) <= self.kv_cache_tokens

    def _prefill_step(self) -> None:
        """This step's prefill: a prompt whose last chunk was computed joining the batch, or else
        whole prompts that fit the budget, then at most one chunk."""
        for seq in [s for s in self._pending if s.stream.abandoned()]:
            self._pending.remove(seq)
            seq.stream.put(seq.delta("", FinishReason.CANCELLED))
        chunked = [s for s in self._pending if s.last_logits is not None]
        if chunked:
            # Joining copies the prompt's cache into the batch's (grown for it before its first chunk)
            # and widens every row's view to its length: a step's prefill work of its own, not an
            # addition to the last chunk's.
            for seq in chunked:
                self._join_chunked(seq)
            return
        whole, chunk = self._plan()
        for seq in whole:
            self._pending.remove(seq)
        if whole:
            self._prefill(whole)
        if chunk is not None:
            self._prefill_chunk(*chunk)

    def _waiting(self) -> int:
        """Requests not yet in the batch: queued, held back, or being prefilled."""
        return self._queue.qsize() + (self._held is not None) + len(self._pending)

    def _step_budget(self, unchunked: int, start: int = 0, waiting: int = 0) -> int:
        """Prompt tokens this step may prefill from position `start` of a prompt: while streams
        decode, the chunk budget times the `waiting` requests per decoding stream (at least once);
        else `unchunked`.

        The chunk budget bounds how long one step pauses the decoding streams. When waiting requests
        outnumber the decoding streams (a burst of new users), keeping to it would make most of
        them wait several steps for a first token to spare a few streams one longer pause: on 2
        cores, 31 chat prompts arriving beside 1 decoding stream waited up to 1.5 s at 0.25 s a
        step. So a step may prefill as many budgets as there are waiting requests per decoding
        stream; a single long prompt (`waiting` = 1) is still taken a chunk at a time."""
        if not (self.prefill_chunk_tokens and self._batch):
            return unchunked
        chunk = self._pacer.tokens(start) if self._pacer else self.prefill_chunk_tokens
        return chunk * max(1, waiting // len(self._batch))

    def _plan(self) -> tuple[list[_Sequence], tuple[_Sequence, int] | None]:
        """Pending prompts in arrival order within the step's token budget: those that fit whole,
        then (the first that does not fit, tokens of it to compute now), or None."""
        budget = self._step_budget(sys.maxsize, waiting=self._waiting())
        whole: list[_Sequence] = []
        for seq in self._pending:
            remaining = seq.n_prompt - seq.computed
            if seq.kv is None and remaining <= budget:
                whole.append(seq)
                budget -= remaining
                continue
            if whole and seq.kv is None and remaining <= self._step_budget(sys.maxsize):
                # A prompt that one chunk holds waits a step to go whole: split, it would take a
                # step to grow the cache, one per chunk and one to join, each with a decode step.
                return whole, None
            # Arrival order, as in vLLM: a prompt being chunked keeps the budget until it is done, so
            # no prompt waits forever behind a stream of shorter ones.
            tokens = min(remaining, budget, self._step_budget(sys.maxsize, seq.computed))
            return whole, ((seq, tokens) if tokens > 0 else None)
        return whole, None

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Computes the new prompts' caches (reusing cached prefixes), adds them to the batch, emits
        their first tokens."""
        # Prompts whose cached prefixes have the same length (typically one shared system prompt;
        # 0 = nothing cached) share one forward over their remaining tokens.
        groups: dict[int, list[_Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.computed, []).append(seq)
        for n, group in groups.items():
            try:
                self._prefill_rows(n, group)
            except Exception as exc:  # this group's prompts alone: the running batch is untouched
                log.exception("prefill failed")
                for seq in group:
                    if seq in self._batch:
                        raise  # it failed after joining the batch: the shared state is suspect
                    seq.stream.fail(EngineError(f"generation failed: {exc}"))

    def _prefill_rows(self, n: int, seqs: list[_Sequence]) -> None:
        """Prefills prompts whose first n tokens are cached (n = 0: none): their remaining tokens are
        right-padded into one batch; the cached prefixes seed the cache."""
        import torch
        from transformers import DynamicCache
        from .batchkv import prefill_mask

        device = self.loaded.input_device
        lengths = [len(s.stream.prompt_ids) for s in seqs]
        width = max(lengths) - n
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :lengths[i] - n] = torch.tensor(s.stream.prompt_ids[n:])
        model = self.loaded.model
        mask = prefill_mask(lengths, n, width, model.config._attn_implementation, model.dtype, device)
        cache = DynamicCache(config=model.config)
        if n:
            prefixes = [s.prefix for s in seqs]
            for layer_idx in range(len(prefixes[0])):
                cache.update(torch.cat([p[layer_idx][0] for p in prefixes]),
                             torch.cat([p[layer_idx][1] for p in prefixes]), layer_idx)
        for s in seqs:
            s.prefix = None
        last = torch.tensor([length - n - 1 for length in lengths])
        began = time.perf_counter()
        # Logits of each row's last prompt token only: all of them would be [rows, width, vocab].
        out = model(input_ids=ids.to(device), attention_mask=mask,
                    position_ids=torch.arange(n, n + width, device=device)[None, :].expand(len(seqs), -1),
                    past_key_values=cache, use_cache=True, logits_to_keep=last[:, None].to(device))
        self._prefill_tokens += sum(lengths) - n * len(seqs)
        logits = out.logits[:, -1, :].float().cpu()  # [rows, vocab]
        if self._pacer:
            self._pacer.observe(n, width, time.perf_counter() - began, rows=len(seqs))
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for i, s in enumerate(seqs):
            self._prefixes.store(s.stream.prompt_ids, layers, i)
        self._join(seqs, layers, lengths, logits)

    def _prefill_chunk(self, seq: _Sequence, tokens: int) -> None:
        """Computes the next `tokens` prompt tokens of `seq` into its own cache (after the last chunk,
        the logits of its first token too), or, before its first, grows the batch's cache for it. A
        failure fails this request alone."""
        try:
            self._compute_chunk(seq, tokens)
        except Exception as exc:  # its own prompt or cache: the running batch is untouched
            log.exception("prefill failed")
            self._pending.remove(seq)
            seq.kv = None
            seq.stream.fail(EngineError(f"generation failed: {exc}"))

    def _compute_chunk(self, seq: _Sequence, tokens: int) -> None:
        import torch
        from .batchkv import PromptKV

        model, device = self.loaded.model, self.loaded.input_device
        if seq.kv is None:
            # The batch's cache must be as wide as the prompt when it joins. Growing it there would
            # add to the join step, which also runs the first decode step at the new width (on 2 cores
            # beside a 3,181-token prompt, that step was the longest pause): before the first chunk,
            # growing is this step's prefill work instead (a failure to grow fails this request alone).
            if self._cache.make_room(self._cache.rows + 1, seq.n_prompt + 1):
                return
            seq.kv, seq.prefix = PromptKV(seq.n_prompt, seq.prefix), None
        kv = seq.kv
        start, end = kv.length, kv.length + tokens
        ids = torch.tensor([seq.stream.prompt_ids[start:end]], device=device)
        mask = kv.chunk_mask(tokens, model.config._attn_implementation, model.dtype, device)
        began = time.perf_counter()
        # On CPU the model's attention (engine/attention.py) groups query heads onto the cached
        # key/value heads itself: a long prompt's cache is never copied per query head.
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(start, end, device=device)[None, :],
                    past_key_values=kv, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float().cpu()  # [1, vocab]; on a GPU, the copy waits for the forward
        if self._pacer:
            self._pacer.observe(start, tokens, time.perf_counter() - began)
        kv.length = seq.computed = end
        self._prefill_tokens += tokens
        self._prefill_chunks += 1
        if end == seq.n_prompt:
            seq.last_logits = logits

    def _join_chunked(self, seq: _Sequence) -> None:
        """Moves a prompt whose chunks are all computed into the batch, with its first token."""
        self._pending.remove(seq)
        try:
            layers = seq.kv.layers()
            self._prefixes.store(seq.stream.prompt_ids, layers, 0, copy=False)  # the cache is dropped below
            self._join([seq], layers, [seq.n_prompt], seq.last_logits)
        except Exception as exc:  # before it joined: this request alone
            if seq in self._batch:
                raise  # it failed after joining the batch: the shared state is suspect
            log.exception("prefill failed")
            seq.stream.fail(EngineError(f"generation failed: {exc}"))
        finally:
            seq.kv = seq.last_logits = None

    def _join(self, seqs: list[_Sequence], layers: list[tuple[Any, Any]], lengths: list[int], logits: Any) -> None:
        self._cache.add(layers, lengths)
        self._batch.extend(seqs)
        self._sample_and_emit(logits, first=len(self._batch) - len(seqs))

    def _decode_step(self) -> None:
        """One forward pass for every running sequence."""
        import torch

        from .compiled import decode_forward

        device = self.loaded.input_device
        tokens = torch.tensor([[s.last_token] for s in self._batch], device=device)
        logits = decode_forward(self._decode, self.loaded.model, self._cache, tokens, device)
        self._steps += 1
        self._sample_and_emit(logits.float().cpu(), first=0)

    def _sample_and_emit(self, logits: Any, first: int) -> None:
        """Chooses the next token of batch rows first.. from logits rows 0..; retires ended rows."""
        import torch

        rows = self._batch[first:]
        stop_ids = self.loaded.stop_token_ids
        failed: dict[int, BaseException] = {}
        for i, seq in enumerate(rows):
            if seq.adjuster is not None:
                try:
                    seq.adjuster.apply(logits[i])
                except Exception as exc:  # this request's penalties alone
                    failed[i] = exc
        constrained = [i for i, s in enumerate(rows) if s.matcher is not None]
        if constrained:
            import xgrammar as xgr

            bitmask = xgr.allocate_token_bitmask(len(rows), self._grammar.vocab_size)
            for i in constrained:
                try:
                    rows[i].matcher.fill_next_token_bitmask(bitmask, i)
                except Exception as exc:  # this row's grammar state broke: it alone fails
                    failed[i] = exc
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=constrained)
        for i, seq in enumerate(rows):
            if seq.matcher is None and (seq.params.ignore_eos or seq.generated < seq.params.min_tokens):
                logits[i, stop_ids] = float("-inf")
        greedy = torch.argmax(logits, dim=-1).tolist()
        finished: set[int] = set()
        for i, seq in enumerate(rows):
            if i in failed:
                continue
            try:
                token = greedy[i] if seq.greedy else next_token(logits[i], seq.params, seq.generator)
                if seq.params.logprobs is not None:
                    seq.logprobs.append((token, *top_logprobs(logits[i], token, seq.params.logprobs)))
                if self._accept(seq, token) is not None:
                    finished.add(first + i)
            except Exception as exc:  # sampling or grammar of this request alone
                failed[i] = exc
        for i, exc in failed.items():
            log.warning("a request failed during generation: %s", exc)
            rows[i].stream.fail(EngineError(f"generation failed: {exc}"))
            finished.add(first + i)
        self._retire(finished)

    def _retire(self, finished: set[int]) -> None:
        """Removes finished rows (already told) and cancelled ones (told here) from the batch."""
        if not finished and not any(s.stream.abandoned() for s in self._batch):
            return
        keep = []
        for r, seq in enumerate(self._batch):
            if r in finished:
                continue
            if seq.stream.cancelled.is_set():
                seq.stream.put(seq.delta("", FinishReason.CANCELLED))
                continue
            keep.append(r)
        order = self._cache.keep(keep)
        self._batch = [self._batch[r] for r in order]

    def _accept(self, seq: _Sequence, token: int) -> FinishReason | None:
        """Records one generated token for `seq` and emits its text; the finish reason once it ends."""
        seq.generated += 1
        self._tokens_generated += 1
        seq.last_token = token
        if seq.adjuster is not None:
            seq.adjuster.observe(token)
        stream, params = seq.stream, seq.params
        if stream.first_token_at is None:
            stream.first_token_at = time.monotonic()
            if self.observe_ttft is not None:
                self.observe_ttft(stream.first_token_at - stream.submitted_at)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected token {token}")
        end_token = token in self.loaded.stop_token_ids and not params.ignore_eos
        hit = False
        if not end_token:
            piece = seq.decoder.push(token)
            if not seq.emitted and self.loaded.strip_leading_newline:
                piece = piece.lstrip("\n")
            text, hit = seq.stops.feed(piece)
            if text:
                seq.emitted = True
                stream.put(seq.delta(text))
        finish = check_stop(end_token=end_token, stop_string=hit,
                            grammar_done=seq.matcher is not None and seq.matcher.is_terminated(),
                            generated=seq.generated, max_tokens=params.max_tokens,
                            total_tokens=seq.n_prompt + seq.generated, context_length=self.context_length)
        if finish is None:
            return None
        tail = ""
        if not hit:  # text after a stop string is dropped; otherwise release what was held back
            tail, _ = seq.stops.feed(seq.decoder.flush())
            tail += seq.stops.flush()
        stream.put(seq.delta(tail, finish))
        return finish
