"""The gateway against its own /openapi.json: schemathesis generates requests from the description
(valid and invalid) and checks every answer: no server error, and status codes, content types and
bodies as declared. Real servers on loopback, the real model, a SQLite catalogue of its own."""

from __future__ import annotations

import dataclasses

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# Generation is the slow part on a CPU: keep every reply a few tokens long.
MAX_TOKENS = 4
CONTEXT = 512
CHAT_PATHS = ("/v1/chat/completions", "/v1/completions", "/api/chat")
# With keys on, the description declares bearer security and schemathesis also checks that calls
# without the key are refused.
KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def described_gateway(kernel, tmp_path_factory):
    from chatglm4.engine.scheduler import LocalEngine
    from conftest import Servers
    from LLMkernel import Kernel

    servers = Servers()
    # The session's weights with a 512-token context (as MAX_CONTEXT=512 would load them): a fuzzed
    # 998-turn history then prefills in seconds on a CPU, not minutes.
    engine = LocalEngine(dataclasses.replace(kernel.engine.loaded, context_length=CONTEXT))
    short = Kernel(engine, default_max_tokens=MAX_TOKENS, default_temperature=kernel.default_temperature)
    model_server = servers.model_server(short)
    db = tmp_path_factory.mktemp("openapi") / "catalogue.db"
    gateway = servers.gateway(model_server.url, f"sqlite:///{db}", embedding_models="", search_model_choice="off",
                               api_keys=KEY)
    yield gateway
    servers.stop_all()
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(described_gateway):
    return schemathesis.openapi.from_url(described_gateway.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _short_generation(case) -> None:
    """Caps a valid max_tokens (and min_tokens) so a fuzzed request cannot ask for minutes of text."""
    body = case.body
    if case.path in CHAT_PATHS and isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and MAX_TOKENS < value < CONTEXT:
                body[name] = MAX_TOKENS


# An uploaded CSV or JSON-lines file is "a string" to JSON Schema; whether its lines are books only
# the importer can say (a malformed line is a 400 naming it), so a random string may rightly fail.
UPLOADS = ("/api/books/import",)


# 400s that a valid request may rightly get and no static schema can declare: more tokens than the
# loaded model's context; a JSON schema (response_format, a tool's parameters) the grammar engine
# cannot compile; tools that contradict each other (tool_choice naming a tool not offered).
UNDECLARABLE = ("context_length_exceeded", "invalid_json_schema", "invalid_tools")


def _undeclarable(response) -> bool:
    try:
        return response.status_code == 400 and response.json()["error"].get("code") in UNDECLARABLE
    except ValueError:
        return False


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_answers_as_described(case):
    _short_generation(case)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    if response.status_code == 413:
        # Larger than MAX_BODY_BYTES (declared): said before anything else is looked at.
        assert response.json()["error"]["type"] == "request_too_large"
        return
    excluded = [positive_data_acceptance] if case.path in UPLOADS or _undeclarable(response) else []
    case.validate_response(response, excluded_checks=excluded, headers={"Authorization": f"Bearer {KEY}"})
