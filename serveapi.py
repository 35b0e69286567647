"""The public gateway: validation, auth, rate limits, the catalogue, the web page, and routing to
the model server(s).

    python serveapi.py --port 8000 --model-server http://127.0.0.1:8001[,URL...]
    python serveapi.py import FILE [--database-url URL]     (bulk import of .csv or .jsonl books)

The catalogue routes keep working while the model servers are away; everything that needs a model
answers 503 with Retry-After within a bounded time instead of hanging."""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import requests
from flask import Flask, Response, jsonify, render_template, request

from chatglm4 import config as cfg
from chatglm4 import drain as draining
from chatglm4 import embedding, errors, headers, importer, sse
from chatglm4.booksearch import BookSearch
from chatglm4.catalogue import Catalogue, CatalogueUnavailable, TitleConflict, load_seed_titles
from chatglm4.metrics import Metrics
from chatglm4.openapi import Api, Route
from chatglm4.protocol import (AddBooksRequest, AddBooksResponse, ApiChatRequest, ApiChatResponse, Book, BookPatch,
                               CompletionRequest, CompletionResponse,
                               BookListQuery, BookListResponse, BookSearchRequest, BookSearchResponse,
                               ChatCompletionRequest, ChatCompletionResponse, HealthResponse, ImportResponse,
                               ModelList, SearchProgress)
from chatglm4.searchindex import CatalogueIndex, FusionSettings
from chatglm4.upstream import ModelServerPool, PoolCollector, conversation_key
from chatglm4.vectors import EmbeddingCache
from chatglm4.wsgi import make_server

log = logging.getLogger("serveapi")

VERSION = "0.1.0"

# What POST /api/books/import accepts, by Content-Type.
IMPORT_TYPES = {"text/csv": ".csv", "application/x-ndjson": ".jsonl", "application/jsonl": ".jsonl"}


def _catalogue_unavailable(exc: CatalogueUnavailable) -> errors.APIError:
    # The driver's text names hosts and users: it goes to the log, not to the caller.
    log.warning("catalogue database unavailable: %s", exc)
    return errors.Unavailable("the catalogue database is unavailable", retry_after=5, code="database_unavailable")


# How the gateway's own failures reach the caller (the model servers' come through upstream.py).
ERRORS = {
    CatalogueUnavailable: _catalogue_unavailable,
    TitleConflict: lambda exc: errors.Conflict(str(exc)),
}

# Statuses by what a route depends on: the model servers (busy or down: 503; broken: 502; their own
# 4xx relayed), the catalogue database (down: 503).
MODEL = (400, 502, 503)
DATABASE = (503,)


def create_app(config: cfg.GatewayConfig, catalogue: Catalogue | None = None,
               pool: ModelServerPool | None = None) -> Flask:
    """The gateway app; the catalogue and the model-server pool come from `config` unless given."""
    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.json.ensure_ascii = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    errors.install(app, ERRORS)
    headers.install(app)
    metrics = Metrics("chatglm4_gateway")
    metrics.install(app)
    api = Api(app)

    catalogue = catalogue or Catalogue(config.database_url, seed_titles=load_seed_titles())
    pool = pool or ModelServerPool(cfg.model_server_urls(config), connect_timeout=config.connect_timeout,
                                   read_timeout=config.upstream_timeout)
    metrics.registry.register(PoolCollector(pool))
    index = build_index(config, catalogue)
    search = BookSearch(catalogue, pool, index, candidates=config.search_candidates,
                        model_choice=config.search_model_choice == "on")
    metrics.gauge("chatglm4_search_books", "books in the search index").set_function(
        lambda: index.progress()["books"])
    for embedder in index.embedders:
        metrics.gauge(f"chatglm4_search_embedded_{embedder.name}", f"books with a {embedder.name} embedding"
                      ).set_function(lambda name=embedder.name: index.progress()["embedded"].get(name, 0))
    keys = cfg.api_keys(config)
    schema = {"ready": False}

    def ensure_schema() -> None:
        # The database may be down at start; the schema is created at the first request that finds it up.
        if not schema["ready"]:
            catalogue.init_schema()
            schema["ready"] = True

    try:
        ensure_schema()
    except CatalogueUnavailable as exc:
        log.warning("catalogue not ready yet: %s", exc)
    index.start()

    def valid_key() -> str | None:
        """The caller's API key if it is one of ours."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token and any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            return token
        return None

    if config.rate_limit:
        from flask_limiter import Limiter

        def client_key() -> str:
            # One bucket per key we issued; anything else (no key, a wrong or reformatted one) counts
            # against the client's address, so made-up headers cannot mint fresh buckets.
            key = valid_key() if keys else None
            if key is not None:
                return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
            return "addr:" + (request.remote_addr or "unknown")

        Limiter(client_key, app=app, storage_uri="memory://", default_limits=[config.rate_limit],
                default_limits_exempt_when=lambda: not _is_api(request.path) or request.method == "OPTIONS")

    @app.before_request
    def _auth():
        if not keys or not _is_api(request.path) or request.method == "OPTIONS":
            return None
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        if valid_key() is None:
            raise errors.Unauthorized("invalid API key")
        return None

    # ------------------------------------------------------------ model routes

    def affinity(messages: list[dict]) -> str:
        """Which conversation this is, so it stays on one replica (and its cached prefix)."""
        return request.headers.get("X-Session-ID") or conversation_key(messages)

    def relay_stream(payload: dict, path: str = "/v1/chat/completions", key: str | None = None) -> Response:
        upstream = pool.request("POST", path, json=payload, stream=True, affinity=key)
        return Response(_relay(upstream), mimetype=sse.MIMETYPE, headers=sse.HEADERS)

    @api.route(Route("POST", "/v1/chat/completions", "OpenAI chat completion (stream true or false)",
                     ChatCompletionRequest, ChatCompletionResponse, streams=True, errors=MODEL))
    def chat_completions():
        chat = errors.parse(ChatCompletionRequest, request)
        payload = chat.model_dump(exclude_none=True, by_alias=True)
        key = affinity(payload["messages"])
        if chat.stream:
            return relay_stream(payload, key=key)
        resp = pool.request("POST", "/v1/chat/completions", json=payload, affinity=key)
        return Response(resp.content, status=resp.status_code, mimetype="application/json")

    @api.route(Route("POST", "/v1/completions", "OpenAI text completion: plain prompt(s) in, text out (stream true "
                     "or false)", CompletionRequest, CompletionResponse, streams=True, chunk=CompletionResponse,
                     errors=MODEL))
    def completions():
        body = errors.parse(CompletionRequest, request)
        payload = body.model_dump(exclude_none=True)
        if body.stream:
            return relay_stream(payload, "/v1/completions")
        resp = pool.request("POST", "/v1/completions", json=payload)
        return Response(resp.content, status=resp.status_code, mimetype="application/json")

    @api.route(Route("GET", "/v1/models", "OpenAI model list", response=ModelList, errors=MODEL))
    def models():
        resp = pool.request("GET", "/v1/models", read_timeout=10)
        return Response(resp.content, status=resp.status_code, mimetype="application/json")

    @api.route(Route("POST", "/api/chat", "chat in the original demo's shape", ApiChatRequest, ApiChatResponse,
                     streams=True, errors=MODEL))
    def api_chat():
        body = errors.parse(ApiChatRequest, request)
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [m.model_dump() for m in body.history] + [{"role": "user", "content": body.prompt}]
        chat = ChatCompletionRequest.model_validate({
            "messages": messages, "stream": body.stream, "max_tokens": body.max_tokens,
            "temperature": body.temperature, "stream_options": {"include_usage": True} if body.stream else None})
        payload = chat.model_dump(exclude_none=True, by_alias=True)
        key = affinity(payload["messages"])
        if body.stream:
            return relay_stream(payload, key=key)
        answer = ChatCompletionResponse.model_validate(
            pool.request("POST", "/v1/chat/completions", json=payload, affinity=key).json())
        return jsonify(ApiChatResponse(respond=answer.choices[0].message.content, usage=answer.usage).model_dump())

    @api.route(Route("POST", "/api/books/search", "book search over the catalogue", BookSearchRequest,
                     BookSearchResponse, errors=MODEL))
    def books_search():
        body = errors.parse(BookSearchRequest, request)
        ensure_schema()
        result = search.search(body.query)
        return jsonify(BookSearchResponse(books=result.books, message=result.message).model_dump())

    # ------------------------------------------------------------ catalogue routes

    @api.route(Route("GET", "/api/books", "a page of the catalogue", response=BookListResponse, query=BookListQuery,
                     errors=DATABASE))
    def books_list():
        query = BookListQuery.model_validate(request.args.to_dict())
        ensure_schema()
        books, total = catalogue.list(query.offset, query.limit)
        return jsonify(BookListResponse(books=books, total=total,
                                        offset=query.offset, limit=query.limit).model_dump())

    @api.route(Route("POST", "/api/books", "add books", AddBooksRequest, AddBooksResponse, status=201,
                     errors=DATABASE))
    def books_add():
        body = errors.parse(AddBooksRequest, request)
        ensure_schema()
        added = catalogue.add_books(body.new_books())
        search.refresh()
        return jsonify(AddBooksResponse(books=added).model_dump()), 201

    @api.route(Route("POST", "/api/books/import", "import a CSV or JSON-lines file of books", response=ImportResponse,
                     uploads=tuple(IMPORT_TYPES), errors=DATABASE))
    def books_import():
        """A librarian's upload: the body is a CSV (header row) or JSON-lines file, imported whole
        or, if a line is malformed, not at all (400 naming the line)."""
        kind = (request.mimetype or "").lower()
        suffix = IMPORT_TYPES.get(kind)
        if suffix is None:
            raise errors.UnsupportedMediaType(
                f"send the file as {' or '.join(IMPORT_TYPES)}, not {kind or 'no content type'}")
        ensure_schema()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(request.get_data(cache=False))
            try:
                report = importer.import_file(catalogue, path, progress=False)
            except importer.ImportFileError as exc:
                raise errors.BadRequest(f"line {exc.line}: {exc.reason}; nothing was imported",
                                        code="malformed_file") from None
        search.refresh()
        return jsonify(ImportResponse(lines=report.lines, added=report.added, present=report.present).model_dump())

    @api.route(Route("PATCH", "/api/books/{book_id}", "edit a book", BookPatch, Book, errors=(404, 409) + DATABASE))
    def books_edit(book_id: int):
        patch = errors.parse(BookPatch, request)
        ensure_schema()
        book = catalogue.update(book_id, patch.changes())
        if book is None:
            raise errors.NotFound(f"no book with id {book_id}")
        search.refresh()
        return jsonify(book.model_dump())

    @api.route(Route("DELETE", "/api/books/{book_id}", "delete a book", status=204, errors=(404,) + DATABASE))
    def books_delete(book_id: int):
        ensure_schema()
        if not catalogue.delete(book_id):
            raise errors.NotFound(f"no book with id {book_id}")
        search.refresh()
        return Response(status=204)

    # ------------------------------------------------------------ operations

    @api.route(Route("GET", "/health", "state of the model server(s), the database and search",
                     response=HealthResponse, auth=False, errors=(503,), failure_body=True))
    def health():
        servers = pool.health()
        try:
            catalogue.ping()
            db = {"ok": True, "backend": catalogue.backend}
        except CatalogueUnavailable as exc:
            db = {"ok": False, "backend": catalogue.backend, "reason": str(exc)}
        progress = index.progress()
        ok = db["ok"] and any(s["ok"] for s in servers.values())
        body = HealthResponse(
            status="ok" if ok else "unavailable",
            components={"database": "ok" if db["ok"] else "unavailable",
                        "model_servers": "ok" if any(s["ok"] for s in servers.values()) else "unavailable",
                        "search": "ok" if progress["ready"] and not progress["error"] else
                        ("unavailable" if progress["error"] else "loading")},
            search=SearchProgress(**{k: progress[k] for k in SearchProgress.model_fields}),
            detail={"database": db, "model_servers": servers, "search": progress} if keys and valid_key() else None)
        resp = jsonify(body.model_dump(exclude_none=True))
        if not ok:
            resp.status_code = 503
            resp.headers["Retry-After"] = "5"
        return resp

    @api.route(Route("GET", "/metrics", "Prometheus metrics", auth=False, content_type="text/plain"))
    def prometheus():
        return metrics.response()

    @api.route(Route("GET", "/openapi.json", "this description", auth=False))
    def openapi():
        return jsonify(spec)

    @api.route(Route("GET", "/", "the web page", auth=False, content_type="text/html"))
    def page():
        return render_template("index.html", auth_required=bool(keys))

    spec = api.spec("ChatGLM4 Web", VERSION, keys=bool(keys))
    app.extensions["chatglm4"] = {"catalogue": catalogue, "pool": pool, "search": search, "index": index, "api": api}
    return app


def build_index(config: cfg.GatewayConfig, catalogue: Catalogue) -> CatalogueIndex:
    """The hybrid search index the config asks for (not started)."""
    embedders = embedding.load(cfg.embedding_models(config))
    cache = EmbeddingCache(config.embedding_cache) if config.embedding_cache and embedders else None
    settings = FusionSettings(floor=config.search_floor, margin=config.search_margin)
    return CatalogueIndex(catalogue, embedders, cache, settings, poll_interval=config.catalogue_poll)


def _is_api(path: str) -> bool:
    return path.startswith(("/v1/", "/api/"))


def _relay(upstream: requests.Response) -> Iterator[bytes]:
    """Model-server SSE bytes as they arrive; closing the client's side closes the upstream too."""
    try:
        for chunk in upstream.iter_content(chunk_size=None):
            yield chunk
    except requests.RequestException as exc:
        log.warning("stream from model server broke: %s", exc)
        yield sse.event(errors.error_body("the model server stopped answering", "service_unavailable"))
        yield sse.DONE
    finally:
        upstream.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "import":
        from chatglm4 import importer

        return importer.main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = cfg.load(cfg.GatewayConfig, argv, description=__doc__.split("\n")[0])
    except cfg.ConfigError as exc:
        log.error("%s", exc)
        return 2
    app = create_app(config)
    drain = draining.Drain(config.shutdown_grace)
    app.wsgi_app = drain.wrap(app.wsgi_app)
    try:
        server = make_server(app, config.host, config.port, config.threads, "chatglm4-gateway")
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    log.info("gateway listening on http://%s:%s (model servers: %s; catalogue: %s)", config.host,
             server.effective_port, ", ".join(cfg.model_server_urls(config)), app.extensions["chatglm4"]["catalogue"].backend)
    try:
        draining.serve(server, drain, "gateway")
    finally:
        app.extensions["chatglm4"]["index"].close()
        app.extensions["chatglm4"]["pool"].close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
