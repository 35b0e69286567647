"""One error shape for both servers: `{"error": {"message", "type"}}` with the right status.

Code raises an `APIError` subclass by name; `install(app)` maps those, pydantic's validation errors,
malformed JSON and werkzeug's HTTP errors to that shape. The one broad catch is the process edge
(`_internal`), which logs the traceback and answers 500 without detail."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Mapping, TypeVar

from flask import Flask, Response
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.code = code


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "authentication_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class UnsupportedMediaType(APIError):
    status, type = 415, "invalid_request_error"


class Conflict(APIError):
    status, type = 409, "conflict_error"


class GenerationFailed(RuntimeError):
    """A generation failed after it was accepted (the engine's errors derive from this, so the
    stream format can report them without importing the engine)."""


class Unavailable(APIError):
    """The model server, the engine's queue or the database cannot take this request now."""

    status, type = 503, "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None):
        super().__init__(message, retry_after=retry_after, code=code)


# werkzeug's statuses, named the way OpenAI-style clients expect.
_HTTP_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "method_not_allowed", 409: "conflict_error", 413: "request_too_large", 415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, code: str | None = None) -> dict:
    body = {"message": message, "type": type_}
    if code:
        body["code"] = code
    return {"error": body}


def error_response(status: int, message: str, type_: str, *, retry_after: int | None = None,
                   code: str | None = None) -> Response:
    resp = Response(json.dumps(error_body(message, type_, code), ensure_ascii=False), status=status,
                    mimetype="application/json")
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def describe_validation(err: ValidationError) -> str:
    """pydantic's errors as one readable line: 'messages.0.role: Input should be ...; ...'."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def install(app: Flask, table: Mapping[type[BaseException], Callable[[Any], APIError]] | None = None) -> None:
    """Registers the handlers that turn every failure into the one JSON error shape.

    `table` maps a server's own exception types to the APIError each becomes: one place per server
    says how its failures reach the caller, instead of try/re-raise blocks in every route."""

    for exc_type, to_api in (table or {}).items():
        def _mapped(err: BaseException, to_api=to_api):
            api = to_api(err)
            if api.status >= 500 and not isinstance(api, Unavailable):
                log.error("%s: %s", type(err).__name__, err)
            return _api(api)

        app.register_error_handler(exc_type, _mapped)

    @app.errorhandler(APIError)
    def _api(err: APIError):
        return error_response(err.status, err.message, err.type, retry_after=err.retry_after, code=err.code)

    @app.errorhandler(ValidationError)
    def _invalid(err: ValidationError):
        return error_response(422, describe_validation(err), "invalid_request_error")

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        message = err.description or err.name
        if status == 413:
            message = "request body is too large"
        resp = error_response(status, message, _HTTP_TYPES.get(status, "http_error"))
        if status == 405 and err.get_response().headers.get("Allow"):
            resp.headers["Allow"] = err.get_response().headers["Allow"]
        if status == 429:
            resp.headers["Retry-After"] = "60"
        return resp

    @app.errorhandler(Exception)
    def _internal(err: Exception):  # the process edge: anything unforeseen is logged, not leaked
        log.exception("unhandled error: %s", err)
        return error_response(500, "internal server error", "internal_error")


# Deeper than any request of ours needs, shallow enough that no parser or validator downstream
# (pydantic, xgrammar's schema compiler) can run out of stack on it.
MAX_JSON_DEPTH = 64


def json_body(request) -> dict:
    """The request's JSON object, or a 4xx saying why not.

    Only `Content-Type: application/json` is read: a browser sends that type cross-origin only
    after a CORS preflight, so a foreign web page cannot post form-typed bodies to a keyless server."""
    raw = request.get_data(cache=True)  # first: an oversized body is a 413 whatever its type
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json, not {request.mimetype or 'no content type'}")
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_float=_number, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _check_tree(body)
    return body


def _number(literal: str) -> float | int:
    # JSON has one number type: 5.0 is the integer 5 to JSON Schema, so it is one here too (strict
    # validation would refuse a float for an integer field).
    value = float(literal)
    return int(value) if value.is_integer() else value


def _not_json(literal: str) -> None:
    raise ValueError(f"{literal} is not a JSON number")


def parse(model: type[M], request) -> M:
    """The request's JSON body as `model`, validated strictly: JSON `false` is no number and `"5"`
    no integer, as /openapi.json says."""
    return model.model_validate(json_body(request), strict=True)


def _check_tree(body: Any) -> None:
    """BadRequest if `body` nests too deeply or holds a lone UTF-16 surrogate ("\\ud800" is valid
    JSON but no UTF-8 text: the database and the model server could not take it)."""
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str) and _SURROGATE.search(node):
            raise BadRequest("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
