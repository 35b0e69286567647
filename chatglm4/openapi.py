"""Routes declared once: `Api.route` registers a Flask view and records what it accepts and answers,
and `/openapi.json` is built from those records, so the description cannot drift from the routes
(tests/test_openapi.py runs schemathesis against it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ChatCompletionChunk, ErrorResponse

# Statuses every route of a kind can answer, whatever it does.
JSON_BODY_ERRORS = (400, 413, 415, 422)   # not JSON / too large / not application/json / invalid
AUTH_ERRORS = (401, 429)                   # missing or wrong key (when keys are on) / over the rate limit


@dataclass(frozen=True)
class Route:
    method: str
    path: str                  # OpenAPI style: /api/books/{book_id} (path parameters are integers)
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()       # what this route answers beyond the statuses of its kind
    auth: bool = True
    streams: bool = False              # also answers text/event-stream when the body asks to stream
    chunk: type[BaseModel] = ChatCompletionChunk  # what each streamed event's data holds
    content_type: str = "application/json"
    uploads: tuple[str, ...] = ()      # a raw body in one of these types instead of a JSON request
    failure_body: bool = False         # the error statuses in `errors` carry `response`, not an error

    def statuses(self, keys: bool) -> tuple[int, ...]:
        kinds = JSON_BODY_ERRORS if self.request is not None else ()
        kinds += (422,) if self.query is not None else ()
        kinds += (400, 413, 415) if self.uploads else ()
        kinds += AUTH_ERRORS if self.auth and keys else (429,) if self.auth else ()
        return tuple(sorted(set(kinds + self.errors)))


@dataclass
class Api:
    """The app's routes: `@api.route(Route(...))` on a view registers it with Flask and here."""

    app: Flask
    routes: list[Route] = field(default_factory=list)

    def route(self, route: Route) -> Callable:
        def register(view: Callable) -> Callable:
            rule = re.sub(r"\{(\w+)\}", r"<int:\1>", route.path)
            self.app.add_url_rule(rule, view.__name__, view, methods=[route.method])
            self.routes.append(route)
            return view

        return register

    def spec(self, title: str, version: str, keys: bool) -> dict:
        return build(self.routes, title, version, keys)


def build(routes: list[Route], title: str, version: str, keys: bool) -> dict:
    """An OpenAPI 3.1 document for `routes`; `keys`: whether the server requires API keys (then the
    routes with `auth` declare bearer security and 401)."""
    models = {m for r in routes for m in (r.request, r.response, r.query) if m is not None} | {ErrorResponse}
    models |= {r.chunk for r in routes if r.streams}
    refs, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                    ref_template="#/components/schemas/{model}")
    ref = {m: refs[(m, "validation")] for m in models}
    error = {"description": "error", "content": {"application/json": {"schema": ref[ErrorResponse]}}}
    paths: dict[str, dict] = {}
    for r in routes:
        operation_id = r.method.lower() + re.sub(r"\W+", "_", r.path).rstrip("_")
        op: dict = {"summary": r.summary, "operationId": operation_id, "responses": {str(r.status): _success(r, ref)}}
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[r.request]}}}
        elif r.uploads:
            op["requestBody"] = {"required": True, "content": {t: {"schema": {"type": "string"}} for t in r.uploads}}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "integer"}}
                  for name in re.findall(r"\{(\w+)\}", r.path)]
        if r.query is not None:
            schema = r.query.model_json_schema()
            params += [{"name": name, "in": "query", "required": False, "schema": prop}
                       for name, prop in schema["properties"].items()]
        if params:
            op["parameters"] = params
        for status in r.statuses(keys):
            if r.failure_body and status in r.errors:
                op["responses"][str(status)] = {"description": "unavailable",
                                                "content": {"application/json": {"schema": ref[r.response]}}}
            else:
                op["responses"][str(status)] = error
        if r.auth and keys:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _success(r: Route, ref: dict) -> dict:
    if r.status == 204:
        return {"description": "done, no body"}
    if r.response is None:
        return {"description": "success", "content": {r.content_type: {"schema": {"type": "string"}}}}
    content = {"application/json": {"schema": ref[r.response]}}
    if r.streams:
        # Server-sent events, described one event at a time (as OpenAPI 3.2's itemSchema does): each
        # `data:` holds a chunk as JSON, or an error object, and the last one is `[DONE]`.
        event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [ref[r.chunk], ref[ErrorResponse]]},
             "description": "a chunk, or an error object, as JSON"},
            {"const": "[DONE]", "description": "the last event"}]}}}
        content["text/event-stream"] = {"schema": event}
    return {"description": "success", "content": content}
