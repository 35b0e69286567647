"""The model server: loads the model once, speaks the OpenAI chat-completions protocol, runs
template tasks.

    python LLMapis.py --model PATH --port 8001
    python LLMapis.py --engine-url http://VLLM_HOST:8000/v1 --port 8001   # loads no model

The port is bound first and the model loaded after, so /health answers 503 "loading" until the
model is ready. Internal: the gateway (serveapi.py) is the public face."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Iterator

from flask import Flask, Response, jsonify, request

from chatglm4 import config as cfg
from chatglm4 import drain as draining
from chatglm4 import errors, headers, sse
from chatglm4.engine import Completion, EngineBusy, EngineError, EngineStats, GenerationStream, SchemaError
from chatglm4.engine.remote import EngineUnavailable, UpstreamRejected
from chatglm4.engine.modelload import default_served_name
from chatglm4.metrics import Metrics
from chatglm4.prompts import TemplateError
from chatglm4.servermetrics import EngineMetrics
from chatglm4.protocol import (AssistantMessage, ChatCompletionRequest, ChatCompletionResponse, Choice,
                               ChoiceLogprobs, CompletionChoice, CompletionRequest, CompletionResponse, FunctionCall,
                               ModelCard, ModelList, TokenLogprob, ToolCall, TopLogprob, Usage, completion_id, now)
from chatglm4.toolcalls import ToolCallParser, finish_reason, split_reply
from chatglm4.wsgi import make_server
from LLMkernel import Kernel, RequestTooLong, TaskNotFound, ToolsInvalid

log = logging.getLogger("LLMapis")


class ServerState:
    """What the routes need; `kernel` is None until the model has loaded."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.kernel: Kernel | None = None
        self.load_error: str | None = None
        self.created = now()

    def require_kernel(self) -> Kernel:
        if self.kernel is None:
            if self.load_error:
                raise errors.Unavailable(f"the model failed to load: {self.load_error}", retry_after=60)
            raise errors.Unavailable("the model is loading", retry_after=5, code="loading")
        return self.kernel

    def stats(self) -> EngineStats:
        return self.kernel.engine.stats() if self.kernel is not None else EngineStats()


def _misconfigured(exc: TemplateError) -> errors.APIError:
    log.error("template task: %s", exc)
    return errors.APIError("this task is misconfigured on the server")


# How the model server's own failures reach the caller: one table instead of a try block per route.
ERRORS = {
    RequestTooLong: lambda exc: errors.BadRequest(str(exc), code="context_length_exceeded"),
    # Which JSON schemas compile depends on the grammar engine, and tools' rules tie fields together:
    # neither can be said by /openapi.json, so each has a code of its own.
    SchemaError: lambda exc: errors.BadRequest(str(exc), code="invalid_json_schema"),
    ToolsInvalid: lambda exc: errors.BadRequest(str(exc), code="invalid_tools"),
    TaskNotFound: lambda exc: errors.NotFound(str(exc)),
    EngineBusy: lambda exc: errors.Unavailable(str(exc), retry_after=1, code="queue_full"),
    EngineUnavailable: lambda exc: errors.Unavailable(str(exc), retry_after=5, code="model_server_unavailable"),
    UpstreamRejected: lambda exc: errors.BadRequest(str(exc), code="upstream_rejected"),
    EngineError: lambda exc: errors.APIError(str(exc)),
    TemplateError: _misconfigured,
}


def create_app(state: ServerState) -> Flask:
    """The model server's Flask app around `state` (whose kernel may arrive later)."""
    app = Flask(__name__)
    app.json.ensure_ascii = False
    errors.install(app, ERRORS)
    headers.install(app)
    metrics = Metrics("chatglm4_model_server")
    metrics.install(app)
    for name, doc, field in (
            ("chatglm4_waiting_requests", "requests queued for the engine", "waiting"),
            ("chatglm4_running_requests", "requests being generated", "running"),
            ("chatglm4_generated_tokens", "tokens generated since start", "tokens_generated"),
            ("chatglm4_prefill_tokens", "prompt tokens computed since start (cached prefixes excluded)",
             "prefill_tokens"),
            ("chatglm4_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", "prefix_hit_tokens")):
        metrics.gauge(name, doc).set_function(lambda field=field: getattr(state.stats(), field))
    ttft = metrics.histogram("chatglm4_time_to_first_token_seconds", "from enqueue to the first generated token")
    engine_metrics = EngineMetrics(metrics.registry, state.stats)

    def observe_ttft(seconds: float) -> None:
        ttft.observe(seconds)
        engine_metrics.ttft.observe(seconds)

    @app.before_request
    def _attach_ttft():
        # The kernel may arrive after the app is built (the model loads in the background).
        if state.kernel is not None and state.kernel.engine.observe_ttft is None:
            state.kernel.engine.observe_ttft = observe_ttft

    @app.post("/v1/chat/completions")
    def chat_completions():
        chat = errors.parse(ChatCompletionRequest, request)
        kernel = state.require_kernel()
        streams = kernel.chat_choices(chat)
        # waitress keeps reading the socket while we generate (channel_request_lookahead), so it can
        # tell us when the client has gone: its generation is then cancelled, streamed or not.
        gone = request.environ.get("waitress.client_disconnected")
        for stream in streams:
            stream.client_gone = gone
        cid, created = completion_id(), now()
        logprobs = _logprob_reader(kernel) if chat.logprobs else None
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            # The n choices are generated together; each is sent whole in turn (chunks carry `index`).
            frames = sse.chat_chunks([_timed(s, engine_metrics) for s in streams], id=cid, created=created,
                                     model=state.model_name, include_usage=include_usage,
                                     tools=lambda: kernel.tool_parser(chat), logprobs=logprobs)
            return Response(_cancel_all_on_close(streams, frames), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
        results = _collect(streams, engine_metrics)
        choices = [_choice(i, r.text, str(r.finish_reason), kernel.tool_parser(chat),
                           logprobs(r.logprobs or []) if logprobs else None) for i, r in enumerate(results)]
        usage = Usage.of(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        body = ChatCompletionResponse(id=cid, created=created, model=state.model_name, usage=usage, choices=choices)
        return jsonify(body.model_dump(exclude_none=True))

    @app.post("/v1/completions")
    def completions():
        body = errors.parse(CompletionRequest, request)
        streams = state.require_kernel().complete(body)
        gone = request.environ.get("waitress.client_disconnected")
        for stream in streams:
            stream.client_gone = gone
        cid, created = completion_id("cmpl-"), now()
        echo = body.prompts() if body.echo else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            frames = sse.completion_chunks([_timed(s, engine_metrics) for s in streams], id=cid, created=created,
                                           model=state.model_name, include_usage=include_usage, echo=echo,
                                           n=body.n)
            return Response(_cancel_all_on_close(streams, frames), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
        results = _collect(streams, engine_metrics)
        # Choices come n per prompt: choice i continues prompt i // n.
        choices = [CompletionChoice(index=i, text=(echo[i // body.n] if echo else "") + r.text,
                                    finish_reason=str(r.finish_reason)) for i, r in enumerate(results)]
        usage = Usage.of(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
        return jsonify(CompletionResponse(id=cid, created=created, model=state.model_name, choices=choices,
                                          usage=usage).model_dump())

    @app.get("/metrics")
    def prometheus():
        return metrics.response()

    @app.get("/v1/models")
    def models():
        card = ModelCard(id=state.model_name, created=state.created,
                         max_model_len=state.kernel.engine.context_length if state.kernel else None)
        return jsonify(ModelList(data=[card]).model_dump())

    @app.post("/tasks/<name>")
    def task(name: str):
        return jsonify(state.require_kernel().run_task(name, errors.json_body(request)))

    @app.get("/health")
    def health():
        if state.kernel is None:
            status = "unavailable" if state.load_error else "loading"
            resp = jsonify({"status": status, "detail": {"model": state.model_name, "error": state.load_error}})
            resp.status_code = 503
            resp.headers["Retry-After"] = "5"
            return resp
        stats = state.stats()
        detail = {"model": state.model_name, "context_length": state.kernel.engine.context_length,
                  "waiting": stats.waiting, "running": stats.running}
        # A remote engine's server can be down or loading while we are up: say so, as it is.
        upstream = state.kernel.engine.health() if hasattr(state.kernel.engine, "health") else {"status": "ok"}
        if upstream["status"] != "ok":
            resp = jsonify({"status": upstream["status"], "detail": {**detail, "engine": upstream}})
            resp.status_code = 503
            resp.headers["Retry-After"] = "5"
            return resp
        return jsonify({"status": "ok", "detail": detail})

    return app


def _logprob_reader(kernel: Kernel) -> Any:
    """Engine log-probability entries -> OpenAI's `logprobs` of a choice (tokens as text)."""
    tokenizer = kernel.engine.tokenizer

    def text(token: int) -> tuple[str, list[int]]:
        piece = tokenizer.decode([token])
        return piece, list(piece.encode("utf-8"))

    def read(entries: list) -> ChoiceLogprobs:
        content = []
        for token, logprob, top in entries:
            piece, raw = text(token)
            content.append(TokenLogprob(token=piece, logprob=logprob, bytes=raw, top_logprobs=[
                TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in ((*text(i), lp) for i, lp in top)]))
        return ChoiceLogprobs(content=content)

    return read


def _choice(index: int, text: str, finish: str, tools: ToolCallParser | None,
            logprobs: ChoiceLogprobs | None = None) -> Choice:
    """A reply as OpenAI's choice: its text, or its content and tool calls."""
    if tools is None:
        return Choice(index=index, message=AssistantMessage(content=text), finish_reason=finish, logprobs=logprobs)
    content, calls = split_reply(text, tools.names, tools.dialect, cut=finish == "length")
    # A call cut off by max_tokens is left out: every call returned parses (finish_reason "length"
    # says the reply was cut).
    message = AssistantMessage(content=content.strip() or None, tool_calls=[
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls if c.closed] or None)
    return Choice(index=index, message=message, finish_reason=finish_reason(finish, calls), logprobs=logprobs)


def _collect(streams: list[GenerationStream], engine_metrics: EngineMetrics) -> list[Completion]:
    """Each stream drained whole (their latencies recorded); all are cancelled if one fails."""
    try:
        results = [s.collect() for s in streams]
    finally:
        for s in streams:
            s.cancel()
    for s, r in zip(streams, results):
        engine_metrics.finished(s.submitted_at, s.first_token_at, r.completion_tokens)
    return results


def _timed(stream: GenerationStream, engine_metrics: EngineMetrics) -> Iterator[Any]:
    """The stream's deltas; when it has ended, its latencies are recorded."""
    last = None
    try:
        for delta in stream:
            last = delta
            yield delta
    finally:
        engine_metrics.finished(stream.submitted_at, stream.first_token_at, last.completion_tokens if last else 0)


def _cancel_all_on_close(streams: list[GenerationStream], frames: Iterator[bytes]) -> Iterator[bytes]:
    """Relays frames; a client that goes away cancels its generations (the WSGI server closes us)."""
    try:
        yield from frames
    finally:
        for stream in streams:
            stream.cancel()


def load_kernel(config: cfg.ModelServerConfig) -> Kernel:
    from chatglm4.engine import modelload
    from chatglm4.engine.scheduler import LocalEngine

    loaded = modelload.load(config.model, dtype=config.dtype, max_memory=config.max_memory,
                            max_context=config.max_context, quantize=config.quantize, gpus=config.gpus)
    engine = LocalEngine(loaded, max_waiting=config.max_waiting, max_batch=config.max_batch,
                         prefix_cache_tokens=config.prefix_cache_tokens,
                         prefill_chunk_tokens=config.prefill_chunk_tokens, kv_cache_tokens=config.kv_cache_tokens,
                         prefill_chunk_seconds=config.prefill_chunk_seconds,
                         compile_decode=config.compile == "on")
    kernel = Kernel(engine, default_max_tokens=config.default_max_tokens,
                    default_temperature=config.default_temperature, candidate_limit=config.search_candidates)
    try:
        kernel.warm_up()
    except BaseException:
        engine.shutdown()
        raise
    log.info("model %s ready on %s, context %d tokens, stop ids %s", loaded.name,
             modelload.describe_device(loaded), loaded.context_length, loaded.stop_token_ids)
    return kernel


def load_remote_kernel(config: cfg.ModelServerConfig, state: ServerState | None = None) -> Kernel:
    """A kernel over the OpenAI-compatible server at config.engine_url (no model is loaded here);
    waits for that server to list its model, so /health says "loading" until then."""
    from chatglm4.engine import remote

    tokenizer = remote.load_tokenizer(config.tokenizer) if config.tokenizer else None
    while True:
        try:
            engine = remote.RemoteEngine(config.engine_url, model=config.engine_model,
                                         context_length=config.max_context or None, tokenizer=tokenizer,
                                         tool_calls=config.engine_tool_calls)
            break
        except EngineBusy as exc:
            log.warning("%s; trying again in 2 s", exc)
            time.sleep(2)
    if state is not None and not config.served_model_name:
        state.model_name = engine.model
    return Kernel(engine, default_max_tokens=config.default_max_tokens,
                  default_temperature=config.default_temperature, candidate_limit=config.search_candidates)


def load_in_background(config: cfg.ModelServerConfig, state: ServerState,
                       kernel_factory: Any = load_kernel) -> threading.Thread:
    """Loads the kernel into `state` on a thread; any failure becomes state.load_error (and /health
    says "unavailable" with the reason) instead of "loading" forever."""

    def _load() -> None:
        try:
            state.kernel = kernel_factory(config)
        except Exception as exc:  # bad files, out of memory, a failing warm-up: all are reported
            state.load_error = str(exc) or type(exc).__name__
            log.exception("model not loaded: %s", state.load_error)

    thread = threading.Thread(target=_load, name="model-loader", daemon=True)
    thread.start()
    return thread


def serve(config: cfg.ModelServerConfig, state: ServerState, kernel_factory: Any = load_kernel) -> None:
    """Binds the port, loads the model in the background, serves until a signal has drained it."""
    drain = draining.Drain(config.shutdown_grace)
    app = create_app(state)
    app.wsgi_app = drain.wrap(app.wsgi_app)
    server = make_server(app, config.host, config.port, config.threads, "chatglm4-model-server")
    load_in_background(config, state, kernel_factory)
    log.info("model server listening on http://%s:%s", config.host, server.effective_port)

    def stop_engine() -> None:
        # Whatever outlived the grace period ends with an error frame instead of a cut connection.
        if state.kernel is not None:
            state.kernel.engine.shutdown()

    draining.serve(server, drain, "model server", after_drain=stop_engine)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = cfg.load(cfg.ModelServerConfig, argv, description=__doc__.split("\n")[0])
    except cfg.ConfigError as exc:
        log.error("%s", exc)
        return 2
    if config.engine_url:
        state = ServerState(config.served_model_name or "remote")
        factory: Any = lambda c: load_remote_kernel(c, state)
    else:
        state = ServerState(config.served_model_name or default_served_name(config.model))
        factory = load_kernel
    try:
        serve(config, state, factory)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
