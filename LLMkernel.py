"""The tasks: chat, and template tasks (a template from templates/, generation constrained by a JSON
schema, parsing, checking the answer against the given data).

A template task is data: a request model, a way to choose what the prompt shows, two templates,
an output schema and a function from parsed output to answer. Adding one means adding an entry to
TASKS; the servers route /tasks/<name> to whatever is registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from chatglm4 import book_task, toolcalls
from chatglm4.conversation import ContextOverflow, fit_conversation
from chatglm4.engine import Engine, GenerationStream, SamplingParams, gendefaults
from chatglm4.prompts import render
from chatglm4.protocol import (BookSearchTaskRequest, BookSearchTaskResponse, ChatCompletionRequest, CompletionRequest,
                               Usage)
from chatglm4.toolcalls import ToolCallParser


class TaskNotFound(LookupError):
    pass


class RequestTooLong(ValueError):
    """The prompt cannot fit the model's context."""


class ToolsInvalid(ValueError):
    """The request's tools contradict each other or its other fields."""


@dataclass(frozen=True)
class TemplateTask:
    name: str
    request_model: type[BaseModel]
    system_template: str
    user_template: str
    # (request, candidate limit) -> the template's variables; "items" are what the model chooses among
    prepare: Callable[[Any, int], dict]
    # variables -> JSON schema of the answer, or None when there is nothing to ask the model
    schema: Callable[[dict], dict | None]
    # variables -> a token budget big enough for any valid answer
    max_tokens: Callable[[dict], int]
    # (raw model text, variables) -> the answer's fields
    finish: Callable[[str, dict], dict]
    # the answer's protocol type: every answer is validated against it before it leaves
    response_model: type[BaseModel]


def _book_prepare(request: BookSearchTaskRequest, limit: int) -> dict:
    books = book_task.narrow(request, limit)
    # The model answers with the books' positions in the list (1..k), not catalogue ids: one or two
    # tokens a choice instead of up to six digits each, so the answer is generated about twice as fast.
    return {"query": request.query, "books": books, "ids": [b.id for b in books],
            "choices": list(range(1, len(books) + 1))}


TASKS: dict[str, TemplateTask] = {
    "book_search": TemplateTask(
        name="book_search",
        request_model=BookSearchTaskRequest,
        system_template="book_search.system.j2",
        user_template="book_search.user.j2",
        prepare=_book_prepare,
        schema=lambda v: book_task.ids_schema(v["choices"]) if v["choices"] else None,
        max_tokens=lambda v: book_task.max_answer_tokens(v["choices"]),
        finish=lambda text, v: {"ids": [v["ids"][n - 1] for n in book_task.parse_ids(text, v["choices"])]},
        response_model=BookSearchTaskResponse,
    ),
}


def completion_budget(asked: int | None, default_max_tokens: int, context: int) -> int:
    """Tokens kept free for a chat reply: what the request asks, else the default capped at a quarter
    of the context (so a long history still leaves most of the context to the prompt)."""
    if asked is not None:
        if asked >= context:
            raise RequestTooLong(f"max_tokens {asked} must be below the model's context of {context} tokens")
        return asked
    return min(default_max_tokens, context // 4)


class Kernel:
    """Chat and template tasks over one engine."""

    def __init__(self, engine: Engine, *, default_max_tokens: int = 512, default_temperature: float | None = None,
                 candidate_limit: int = 8):
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        # None: the model's own (generation_config.json), else ours (engine/gendefaults.py).
        self.default_temperature = default_temperature
        self.candidate_limit = candidate_limit

    def sampling_defaults(self) -> dict[str, float]:
        """What a request leaves unset: the operator's setting, else the model's, else ours."""
        defaults = {**gendefaults.BUILT_IN, **(getattr(self.engine, "generation_defaults", None) or {})}
        if self.default_temperature is not None:
            defaults["temperature"] = self.default_temperature
        return defaults

    # ------------------------------------------------------------ chat

    def chat(self, request: ChatCompletionRequest) -> GenerationStream:
        """Starts generating a reply (the first, for n > 1: see `chat_choices`)."""
        return self.chat_choices(request)[0]

    def chat_choices(self, request: ChatCompletionRequest) -> list[GenerationStream]:
        """Starts generating the request's n replies, together in the batch; the oldest turns are
        dropped if the conversation is too long. With tools, read each through `tool_parser(request)`."""
        problem = request.tool_problem()
        if problem:
            raise ToolsInvalid(problem)
        context = self.engine.context_length
        budget = completion_budget(request.requested_max_tokens(), self.default_max_tokens, context)
        dialect = self.tool_dialect()
        tools = request.tools if request.calls_tools() else None
        # Earlier tool calls and results are rendered even when this request offers no tools.
        messages = toolcalls.prompt_messages([m.model_dump(exclude_none=True) for m in request.messages],
                                             tools, dialect)
        listed = [t.model_dump(exclude_none=True) for t in tools] if tools and dialect.native else None

        def encode(kept: list[dict]) -> list[int]:
            return self.engine.encode_chat(toolcalls.with_tools(kept, listed), tools=listed)

        try:
            _, prompt_ids = fit_conversation(messages, encode, context - budget)
        except ContextOverflow as exc:
            raise RequestTooLong(str(exc)) from None
        grammar = self._grammar(request, dialect)
        return self._start([(prompt_ids, request.to_sampling_params(
            max_tokens=budget, defaults=self.sampling_defaults(), grammar=grammar, choice=i)) for i in range(request.n)])

    def complete(self, request: CompletionRequest) -> list[GenerationStream]:
        """Starts one plain-text continuation per prompt (generated together, in one batch)."""
        context = self.engine.context_length
        budget = completion_budget(request.max_tokens, self.default_max_tokens, context)
        prompts = [self.engine.encode_text(p) for p in request.prompts()]
        for ids in prompts:
            if len(ids) + budget > context:
                raise RequestTooLong(f"the prompt needs {len(ids)} tokens and max_tokens {budget} more, over the "
                                     f"model's context of {context}")
        defaults = self.sampling_defaults()
        # OpenAI's order: each prompt's n choices in turn.
        return self._start([(ids, request.to_sampling_params(max_tokens=budget, defaults=defaults, choice=i))
                            for ids in prompts for i in range(request.n)])

    def _start(self, work: list[tuple[list[int], SamplingParams]]) -> list[GenerationStream]:
        """One stream per (prompt, params), all or none: a busy engine refuses the whole request."""
        streams: list[GenerationStream] = []
        try:
            for ids, params in work:
                streams.append(self.engine.generate(ids, params))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def tool_dialect(self) -> toolcalls.Dialect:
        return toolcalls.dialect_for(getattr(self.engine, "tool_dialect", None))

    def tool_parser(self, request: ChatCompletionRequest) -> ToolCallParser | None:
        """What splits this request's reply into content and tool calls (None: it offers no tools)."""
        if not request.calls_tools():
            return None
        return ToolCallParser([t.function.name for t in request.tools], self.tool_dialect())

    def _grammar(self, request: ChatCompletionRequest, dialect: toolcalls.Dialect) -> Any:
        if request.calls_tools():
            return self.engine.compile_structural_tag(toolcalls.structural_tag(
                request.tools, request.tool_choice or "auto", request.parallel_tool_calls, dialect))
        fmt = request.response_format
        if fmt is None or fmt.type == "text":
            return None
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
        return self.engine.compile_json_schema(schema)

    def warm_up(self) -> None:
        """Pays one-time costs (grammar tokenizer tables, first forward pass) before /health says ready."""
        self.run_task("book_search", {"query": "warm up", "books": [{"id": 1, "title": "warm up"}]})

    # ------------------------------------------------------------ template tasks

    def run_task(self, name: str, body: dict) -> dict:
        """Validates `body` for task `name`, runs it, and returns its answer with usage."""
        task = TASKS.get(name)
        if task is None:
            raise TaskNotFound(f"no task named {name!r}; known: {', '.join(sorted(TASKS))}")
        request = task.request_model.model_validate(body)
        variables = task.prepare(request, self.candidate_limit)
        schema = task.schema(variables)
        if schema is None:
            return self._answer(task, task.finish("", variables), Usage.of(0, 0))
        messages = [
            {"role": "system", "content": render(task.system_template, **variables)},
            {"role": "user", "content": render(task.user_template, **variables)},
        ]
        prompt_ids = self.engine.encode_chat(messages)
        max_tokens = task.max_tokens(variables)
        if len(prompt_ids) + max_tokens > self.engine.context_length:
            raise RequestTooLong(f"the {name} prompt needs {len(prompt_ids)} tokens, over the context")
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                grammar=self.engine.compile_json_schema(schema))
        result = self.engine.generate(prompt_ids, params).collect()
        return self._answer(task, task.finish(result.text, variables),
                            Usage.of(result.prompt_tokens, result.completion_tokens))

    @staticmethod
    def _answer(task: TemplateTask, fields: dict, usage: Usage) -> dict:
        return task.response_model.model_validate({**fields, "usage": usage}).model_dump()
