"""The gateway's OpenAPI description, built from its route table and the pydantic wire types."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ErrorResponse


@dataclass(frozen=True)
class Route:
    method: str
    path: str            # OpenAPI style: /api/books/{id}
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    auth: bool = True
    streams: bool = False
    content_type: str = "application/json"


def build(routes: list[Route], title: str, version: str) -> dict:
    """An OpenAPI 3.1 document for `routes`."""
    models = {m for r in routes for m in (r.request, r.response, r.query) if m is not None} | {ErrorResponse}
    refs, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                    ref_template="#/components/schemas/{model}")
    ref = {m: refs[(m, "validation")] for m in models}
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict = {"summary": r.summary, "responses": {}}
        ok = "204" if r.method == "DELETE" else "200"
        if r.response is not None:
            content = {"application/json": {"schema": ref[r.response]}}
            if r.streams:
                content["text/event-stream"] = {"schema": {"type": "string"}}
            op["responses"][ok] = {"description": "success", "content": content}
        else:
            op["responses"][ok] = {"description": "success",
                                   **({} if ok == "204" else {"content": {r.content_type: {"schema": {"type": "string"}}}})}
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[r.request]}}}
        params = []
        if "{id}" in r.path:
            params.append({"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}})
        if r.query is not None:
            for name, field in r.query.model_fields.items():
                params.append({"name": name, "in": "query", "required": False,
                               "schema": {"type": "integer", "default": field.default}})
        if params:
            op["parameters"] = params
        err = {"description": "error", "content": {"application/json": {"schema": ref[ErrorResponse]}}}
        for status in (("401",) if r.auth else ()) + ("400", "422", "503"):
            op["responses"].setdefault(status, err)
        if r.auth:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
