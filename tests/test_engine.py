"""The engine package's contract: its boundary (nothing heavy outside it), its stop rule, its
shutdown, and isolation (a request whose own state breaks fails alone)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import pytest
import requests

from chatglm4.engine import EngineBusy, EngineError, FinishReason
from chatglm4.engine.pacing import MIN_CHUNK_TOKENS
from chatglm4.engine.sampling import SamplingParams
from chatglm4.engine.scheduler import LocalEngine, check_stop
from conftest import ROOT


def imported_after(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_gateway_loads_no_torch_transformers_or_xgrammar():
    loaded = imported_after("import serveapi")
    assert not loaded & {"torch", "transformers", "xgrammar"}, loaded & {"torch", "transformers", "xgrammar"}


def test_the_stream_format_does_not_import_the_engine():
    out = subprocess.run([sys.executable, "-c", "import sys, chatglm4.sse; print('chatglm4.engine' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("kwargs, expected", [
    ({}, None),
    ({"end_token": True}, FinishReason.STOP),
    ({"stop_string": True}, FinishReason.STOP),
    ({"grammar_done": True}, FinishReason.STOP),
    ({"generated": 8}, FinishReason.LENGTH),                      # max_tokens reached
    ({"total_tokens": 100}, FinishReason.LENGTH),                 # context full
    ({"end_token": True, "generated": 8}, FinishReason.STOP),     # a stop on the last allowed token is a stop
])
def test_check_stop(kwargs, expected):
    args = {"end_token": False, "stop_string": False, "grammar_done": False, "generated": 3, "max_tokens": 8,
            "total_tokens": 50, "context_length": 100, **kwargs}
    assert check_stop(**args) == expected


@pytest.fixture
def engine(kernel):
    """A private engine over the session's model, shut down after the test."""
    engine = LocalEngine(kernel.engine.loaded, max_waiting=4, max_batch=2)
    yield engine
    engine.shutdown()


def prompt(engine, text: str = "Tell a long story.") -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def test_shutdown_ends_running_and_waiting_streams(engine):
    streams = [engine.generate(prompt(engine), SamplingParams(max_tokens=10_000, ignore_eos=True)) for _ in range(4)]
    first = iter(streams[0])
    next(first)  # the batch is generating (2 running, 2 waiting)
    errors: list[BaseException] = []

    def drain(stream) -> None:
        try:
            stream.collect()
        except EngineError as exc:
            errors.append(exc)

    readers = [threading.Thread(target=drain, args=(s,)) for s in streams[1:]]
    for r in readers:
        r.start()
    engine.shutdown()
    for r in readers:
        r.join(timeout=10)
    assert not any(r.is_alive() for r in readers), "a reader still blocks after shutdown"
    with pytest.raises(EngineError):
        list(first)
    assert len(errors) == 3
    with pytest.raises(EngineBusy):
        engine.generate(prompt(engine), SamplingParams(max_tokens=1))


POISON = [
    # Each breaks only its own request's state inside the engine.
    pytest.param(SamplingParams(max_tokens=8, temperature=0.8, seed=2 ** 64), id="seed-beyond-64-bits"),
    pytest.param(SamplingParams(max_tokens=8, temperature=0.8, top_p=float("nan")), id="nan-top-p"),
    pytest.param(SamplingParams(max_tokens=8, temperature=float("inf")), id="infinite-temperature"),
]


@pytest.mark.parametrize("poison", POISON)
def test_a_poisoned_request_fails_alone(kernel, poison):
    engine = LocalEngine(kernel.engine.loaded, max_batch=8)
    try:
        healthy_params = SamplingParams(max_tokens=24, ignore_eos=True)
        solo = engine.generate(prompt(engine, "Count to ten."), healthy_params).collect().text
        healthy = [engine.generate(prompt(engine, "Count to ten."), healthy_params) for _ in range(3)]
        bad = engine.generate(prompt(engine, "Count to ten."), poison)
        outcome = "completed"
        try:
            bad.collect()
        except EngineError:
            outcome = "failed"
        results = [s.collect() for s in healthy]
        assert [r.text for r in results] == [solo] * 3
        assert all(r.completion_tokens == 24 for r in results)
        # It may be refused or may degrade to something valid, but never take the others down.
        assert outcome in ("failed", "completed")
    finally:
        engine.shutdown()


def test_tiny_temperature_is_greedy(kernel):
    engine = kernel.engine
    ids = prompt(engine, "Name a colour.")
    greedy = engine.generate(ids, SamplingParams(max_tokens=12)).collect().text
    tiny = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1e-309, seed=1)).collect().text
    assert tiny == greedy


@pytest.mark.parametrize("body, status", [
    ({"seed": 2 ** 64}, 422),
    ({"seed": -(2 ** 63) - 1}, 422),
    ({"seed": 2 ** 64 - 1, "temperature": 0.7}, 200),
    ({"temperature": 1e-309}, 200),
])
def test_seed_and_temperature_edges_over_http(model_server, body, status):
    r = requests.post(model_server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})
    assert r.status_code == status, r.text
    assert requests.get(model_server.url + "/health", timeout=5).status_code == 200


def test_a_failed_load_says_unavailable_with_the_reason(serve):
    from chatglm4 import config as cfg
    from LLMapis import ServerState, create_app, load_in_background

    def out_of_memory(_config):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    state = ServerState("doomed")
    load_in_background(cfg.ModelServerConfig(), state, out_of_memory).join(timeout=10)
    server = serve(create_app(state), healthy=False)
    r = requests.get(server.url + "/health", timeout=5)
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable" and "CUDA out of memory" in r.json()["detail"]["error"]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                      timeout=5)
    assert r.status_code == 503 and "CUDA out of memory" in r.json()["error"]["message"]


# ------------------------------------------------------------ chunked prefill

# Small chunks, so a test prompt of a few hundred tokens takes many of them; 48 is not a multiple
# of the prefix cache's block, so chunk edges fall inside blocks.
CHUNK = 48
GREEDY_16 = SamplingParams(max_tokens=16, ignore_eos=True)


def long_prompt(engine, lines: int = 40, topic: str = "fox") -> list[int]:
    """A chat prompt of several hundred tokens (40 lines: about 600)."""
    text = " ".join(f"Line {i}: the quick brown {topic} jumps over the lazy dog number {i}." for i in range(lines))
    return prompt(engine, text + " Which line mentions number 7?")


def chunks_of(n_tokens: int, chunk: int = CHUNK) -> int:
    return -(-n_tokens // chunk)


@contextlib.contextmanager
def decoding(engine):
    """Yields a stream that decodes for the whole block (prompts are chunked only while one decodes)."""
    stream = engine.generate(prompt(engine), SamplingParams(max_tokens=10_000, ignore_eos=True))
    deltas = iter(stream)
    next(deltas)
    try:
        yield stream
    finally:
        stream.cancel()
    assert [d.finish_reason for d in deltas][-1] == FinishReason.CANCELLED


def unchunked_greedy(loaded, ids: list[int]) -> str:
    """The greedy text of `ids` alone, prefilled in one forward, without a prefix cache."""
    engine = LocalEngine(loaded, prefill_chunk_tokens=0, prefix_cache_tokens=0)
    try:
        return engine.generate(ids, GREEDY_16).collect().text
    finally:
        engine.shutdown()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(kernel):
    engine = LocalEngine(kernel.engine.loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0, prefix_cache_tokens=0)
    try:
        ids = long_prompt(engine)
        seen: list[int] = []  # prefill chunks done at each of the running stream's deltas
        with decoding(engine) as running:
            put = running.put
            running.put = lambda delta: (seen.append(engine.stats().prefill_chunks), put(delta))  # engine thread
            text = engine.generate(ids, GREEDY_16).collect().text
        chunks = engine.stats().prefill_chunks
        assert chunks == chunks_of(len(ids))
        # The running stream got tokens after (nearly) every chunk, not only after the whole prompt.
        between = {k for k in seen if 1 <= k < chunks}
        assert len(between) >= chunks - 2, (between, chunks)
        # The chunked prompt, prefilled beside a decoding batch, reads as it does alone and unchunked.
        assert text == unchunked_greedy(kernel.engine.loaded, ids) and text
    finally:
        engine.shutdown()


def test_chunks_shrink_to_the_time_a_chunk_may_take(kernel):
    """Paced by time, a chunk holds fewer tokens where a chunk of full size would take too long: with
    a time no forward can keep, every chunk is the minimum (the decoding stream's prefill was timed)."""
    loaded = kernel.engine.loaded
    engine = LocalEngine(loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=1e-6, prefix_cache_tokens=0)
    try:
        ids = long_prompt(engine, lines=8)
        with decoding(engine):
            start = engine.stats()
            text = engine.generate(ids, GREEDY_16).collect().text
            done = engine.stats()
        computed = done.prefill_tokens - start.prefill_tokens
        assert computed == len(ids)
        assert done.prefill_chunks - start.prefill_chunks == chunks_of(computed, MIN_CHUNK_TOKENS)
        assert text == unchunked_greedy(loaded, ids) and text
    finally:
        engine.shutdown()


def test_the_batch_cache_grows_for_a_chunked_prompt_before_its_first_chunk(kernel):
    """The join step (which also decodes at the new width) does not reallocate the batch's cache: it
    was grown to the prompt's length in a step before the first chunk."""
    engine = LocalEngine(kernel.engine.loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0,
                         prefix_cache_tokens=0)
    try:
        ids = long_prompt(engine, lines=20)
        seen: list[tuple[int, int, int]] = []  # (chunks, reallocations, capacity) at each running delta
        with decoding(engine) as running:
            put = running.put
            running.put = lambda delta: (seen.append((engine.stats().prefill_chunks, engine._cache.reallocations,
                                                      engine._cache.capacity)), put(delta))
            assert engine.generate(ids, GREEDY_16).collect().text
        chunks = engine.stats().prefill_chunks
        assert chunks == chunks_of(len(ids)) > 2
        during = [(r, c) for k, r, c in seen if k >= 1]
        assert during and all(c > len(ids) for _, c in during)  # wide enough from the first chunk on
        assert len({r for r, _ in during}) == 1  # and not reallocated since, the join included
        assert any(k == chunks for k, _, _ in seen)  # the stream decoded after the join
    finally:
        engine.shutdown()


def test_with_nothing_decoding_a_long_prompt_is_prefilled_whole(kernel):
    engine = LocalEngine(kernel.engine.loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0)
    try:
        engine.generate(long_prompt(engine), SamplingParams(max_tokens=1)).collect()
        assert engine.stats().prefill_chunks == 0
    finally:
        engine.shutdown()


def test_a_chunked_prompt_is_reused_from_the_prefix_cache(kernel):
    loaded = kernel.engine.loaded
    engine = LocalEngine(loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0)
    try:
        first = long_prompt(engine)
        longer = first + long_prompt(engine, lines=20, topic="cat")  # the next turn starts with it
        with decoding(engine):
            start = engine.stats()
            text = engine.generate(first, GREEDY_16).collect().text
            chunked = engine.stats()
            computed = chunked.prefill_tokens - start.prefill_tokens
            assert chunked.prefill_chunks - start.prefill_chunks == chunks_of(computed) > 1
            assert engine.generate(first, GREEDY_16).collect().text == text
            again = engine.stats()
            assert again.prefix_hit_tokens - chunked.prefix_hit_tokens >= len(first) - 32
            assert again.prefill_tokens - chunked.prefill_tokens <= 32
            # A longer prompt starting with it starts its chunks from the cached prefix.
            longer_text = engine.generate(longer, GREEDY_16).collect().text
            after = engine.stats()
        assert after.prefix_hit_tokens - again.prefix_hit_tokens >= len(first) - 32
        assert after.prefill_chunks - again.prefill_chunks == chunks_of(after.prefill_tokens - again.prefill_tokens) > 1
        assert longer_text == unchunked_greedy(loaded, longer)
    finally:
        engine.shutdown()


def test_a_prompt_failing_between_its_chunks_fails_alone(kernel):
    engine = LocalEngine(kernel.engine.loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0)
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        solo = engine.generate(prompt(engine, "Count to ten."), params).collect().text
        healthy = engine.generate(prompt(engine, "Count to ten."), params)
        deltas = iter(healthy)
        texts = [next(deltas).text]  # it is decoding
        ids = long_prompt(engine)
        # A token the model has no embedding for, a few chunks in: that chunk's forward raises.
        broken = ids[:6 * CHUNK] + [kernel.engine.loaded.model.config.vocab_size + 10] + ids[6 * CHUNK:]
        with pytest.raises(EngineError):
            engine.generate(broken, params).collect()
        assert engine.stats().prefill_chunks >= 4  # it failed chunks in (a cached prefix may save one)
        texts += [d.text for d in deltas]
        assert "".join(texts) == solo
        assert engine.generate(prompt(engine, "Count to ten."), params).collect().text == solo
    finally:
        engine.shutdown()


def test_a_prompt_cancelled_between_its_chunks_ends_cancelled(kernel):
    engine = LocalEngine(kernel.engine.loaded, prefill_chunk_tokens=CHUNK, prefill_chunk_seconds=0)
    try:
        with decoding(engine) as running:
            late = engine.generate(long_prompt(engine), SamplingParams(max_tokens=16))
            put = running.put

            def cancel_after_two_chunks(delta):  # on the engine's thread, so it happens between chunks
                if engine.stats().prefill_chunks >= 2:
                    late.cancel()
                put(delta)

            running.put = cancel_after_two_chunks
            ending = list(late)
        assert [(d.finish_reason, d.completion_tokens) for d in ending] == [(FinishReason.CANCELLED, 0)]
        assert 2 <= engine.stats().prefill_chunks < chunks_of(len(late.prompt_ids))
    finally:
        engine.shutdown()


def test_the_batch_cache_is_allocated_once_reused_and_bounded(kernel):
    loaded = kernel.engine.loaded
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * loaded.model.dtype.itemsize
    # Room for three rows of 128 positions: of six requests at once, three run and three wait.
    engine = LocalEngine(loaded, kv_cache_tokens=3 * 128, prefix_cache_tokens=0)
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        ids = prompt(engine, "Count to ten.")
        assert len(ids) + 24 < 127
        solo = engine.generate(ids, params).collect().text
        running: list[int] = []
        reallocations = []
        for _wave in range(3):
            streams = [engine.generate(ids, params) for _ in range(6)]
            for stream in streams:  # called on the engine's thread at each delta
                stream.put = lambda delta, put=stream.put: (running.append(engine.stats().running), put(delta))
            texts = [s.collect().text for s in streams]
            assert texts == [solo] * 6  # those that waited read the same, and none failed
            reallocations.append(engine._cache.reallocations)
        assert max(running) == 3
        assert reallocations[0] == reallocations[1] == reallocations[2]  # warm: no new buffers
        assert 0 < engine.stats().kv_cache_bytes <= 3 * 128 * per_token
    finally:
        engine.shutdown()


def test_rows_leaving_the_batch_keep_the_others_output(kernel):
    """Rows finish out of order (holes filled by the last row); every text still reads as alone."""
    engine = LocalEngine(kernel.engine.loaded, prefix_cache_tokens=0)
    try:
        lengths = [3, 17, 5, 30, 9, 12, 1, 24]
        ids = prompt(engine, "Tell a long story.")
        alone = {n: engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True)).collect().text for n in lengths}
        streams = [engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True)) for n in lengths]
        assert [s.collect().text for s in streams] == [alone[n] for n in lengths]
    finally:
        engine.shutdown()


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_linears_compute_as_plain_ones_and_a_row_alone_as_in_a_batch(dtype):
    import torch

    from chatglm4.engine.modelload import pack_for_cpu

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    # 1536 inputs: the MLP's down projection, where oneDNN's one-row kernel rounds differently.
    model = torch.nn.Sequential(torch.nn.Linear(1536, 576), torch.nn.ReLU(), torch.nn.Linear(576, 32, bias=False)).to(dtype)
    x = torch.randn(8, 1, 1536, dtype=dtype)
    with torch.inference_mode():
        plain = model(x)
        model.dtype = dtype  # what a transformers model reports
        if dtype == torch.bfloat16 and not cpu_flags() & {"avx512bw", "avx_ne_convert"}:
            # oneDNN refuses to pack bf16 here: the layers stay plain and keep computing.
            assert pack_for_cpu(model) == 0 and torch.equal(model(x), plain)
            pytest.skip("oneDNN packs bf16 weights only with AVX512 or AVX-NE-CONVERT")
        assert pack_for_cpu(model) == 2
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        packed = model(x)
        alone = [model(x[r:r + 1]) for r in range(8)]
    assert packed.shape == plain.shape and packed.dtype == dtype
    assert torch.allclose(packed.float(), plain.float(), atol=0.05, rtol=0.02)
    # A request decoded alone reads as it does in a batch: the same bits, not merely close ones.
    assert all(torch.equal(alone[r][0], packed[r]) for r in range(8))


def test_fused_projections_compute_what_the_separate_ones_do(kernel):
    """q, k and v as one product, gate and up as another (engine/fusion.py): the session's model gives
    the same logits, bit for bit, and the same greedy text as the model loaded with them apart."""
    import torch

    from chatglm4.engine import modelload
    from chatglm4.engine.fusion import FusedAttention, FusedMLP

    fused = kernel.engine.loaded.model
    assert all(isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
               and not layer.self_attn.training and not layer.mlp.training for layer in fused.model.layers)
    apart = modelload.load(None, dtype=str(fused.dtype).removeprefix("torch."), fuse=False).model
    assert not isinstance(apart.model.layers[0].self_attn, FusedAttention)
    assert hasattr(apart.model.layers[0].self_attn, "q_proj") and not hasattr(fused.model.layers[0].self_attn, "q_proj")
    ids = torch.tensor([kernel.engine.encode_chat([{"role": "user", "content": "Why is the sea salty?"}])])
    with torch.inference_mode():
        assert torch.equal(fused(input_ids=ids).logits, apart(input_ids=ids).logits)
        texts = [m.generate(ids, max_new_tokens=12, do_sample=False) for m in (fused, apart)]
    assert torch.equal(texts[0], texts[1])


def test_cpu_attention_does_not_depend_on_the_batch_width(kernel):
    """A prompt prefilled alone, and padded beside a longer one: the same logits, bit for bit, and
    close to what transformers' own SDPA computes."""
    import torch
    from transformers import DynamicCache

    from chatglm4.engine.attention import ATTENTION
    from chatglm4.engine.batchkv import prefill_mask

    loaded = kernel.engine.loaded
    model = loaded.model
    assert model.config._attn_implementation == ATTENTION
    short = kernel.engine.encode_chat([{"role": "user", "content": "How do airplanes fly?"}])
    long = kernel.engine.encode_chat([{"role": "user", "content": "Write a poem about winter, snow, wind and stars."}])
    width = max(len(short), len(long))
    assert len(short) < width

    def last_logits(rows: list[list[int]], implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        w = max(map(len, rows))
        ids = torch.zeros(len(rows), w, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
        mask = prefill_mask([len(r) for r in rows], 0, w, implementation, model.dtype, "cpu")
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(w)[None].expand(len(rows), -1),
                    past_key_values=DynamicCache(config=model.config), use_cache=True)
        return out.logits[0, len(rows[0]) - 1].float()

    try:
        with torch.inference_mode():
            alone = last_logits([short], ATTENTION)
            padded = last_logits([short, long], ATTENTION)
            reference = last_logits([short], "sdpa")
    finally:
        model.set_attn_implementation(ATTENTION)
    assert torch.equal(alone, padded)
    assert alone.argmax() == reference.argmax()
    assert torch.allclose(alone, reference, atol=0.5, rtol=0.05), (alone - reference).abs().max()
