"""JSON-schema-constrained decoding with xgrammar.

xgrammar compiles a schema into a grammar over the tokenizer's vocabulary once, then per step gives
a bitmask of the tokens that keep the output valid. It was chosen over outlines and
lm-format-enforcer because its per-sequence matchers are cheap (microseconds a step on CPU), so the
same code serves one request or a batch, and it supports enum, maxItems and the other keywords our
task schemas use."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any


class SchemaError(ValueError):
    """The JSON schema cannot be compiled into a grammar."""


class GrammarCache:
    """Compiles JSON schemas for one tokenizer; keeps the most recent ones."""

    def __init__(self, tokenizer: Any, model_config: Any, stop_token_ids: list[int], size: int = 64):
        import xgrammar as xgr

        # Masks must match the logits, which follow the model's vocabulary (it may have padding rows
        # beyond the tokenizer's).
        vocab_size = getattr(model_config, "vocab_size", None) or len(tokenizer)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids)
        self.vocab_size = self.info.vocab_size
        self.compiler = xgr.GrammarCompiler(self.info)
        self.size = size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, schema: dict) -> Any:
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            # Compact JSON: no free whitespace for the model to wander into.
            grammar = self.compiler.compile_json_schema(key, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise SchemaError(f"cannot use this JSON schema: {exc}") from exc
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return grammar
