"""Stand-ins for the tests that must not reach a model server."""

from __future__ import annotations

from typing import Any


class StubPool:
    """A model-server pool for a gateway whose answers never need the model (validation, routing):
    every call to the model fails the test, and /health sees no model server."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *, json: Any = None, stream: bool = False,
                read_timeout: float | None = None) -> Any:
        self.calls.append((method, path))
        raise AssertionError("the model server must not be called")

    def health(self) -> dict[str, dict]:
        return {}
