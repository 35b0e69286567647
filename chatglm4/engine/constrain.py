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
        # Compact JSON: no free whitespace for the model to wander into.
        return self._compiled(("json_schema", schema),
                              lambda key: self.compiler.compile_json_schema(key, any_whitespace=False),
                              "cannot use this JSON schema")

    def compile_structural_tag(self, tag: dict) -> Any:
        """A grammar from an xgrammar structural tag: free text and tagged parts (tool calls), each
        part's content held to its own JSON schema."""
        return self._compiled(("structural_tag", tag), self.compiler.compile_structural_tag,
                              "cannot use these tools' JSON schemas")

    def _compiled(self, what: tuple[str, dict], compile_text: Any, failure: str) -> Any:
        text = json.dumps(what[1], sort_keys=True, ensure_ascii=False)
        key = what[0] + ":" + text
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = compile_text(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise SchemaError(f"{failure}: {exc}") from exc
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return grammar
