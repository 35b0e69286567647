"""Every wire type of the gateway, the model server and the example client, in one place.

Requests validate themselves (pydantic); the same models produce /openapi.json. The chat types follow
the OpenAI chat-completions protocol, with vLLM's `ignore_eos` and `min_tokens` extensions."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from typing import Annotated

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator,
                      model_validator)

# ---------------------------------------------------------------- OpenAI chat completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


# More turns than any context holds; past this a request is refused instead of fitted.
MAX_MESSAGES = 1000


# OpenAI's rule for function names; it also keeps a name safe inside the grammars and prompts.
FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(BaseModel):
    name: FunctionName
    # A JSON object as text, as OpenAI sends it.
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


Content = str | list[TextPart]


class _Message(BaseModel):
    @field_validator("content", check_fields=False)
    @classmethod
    def _join_parts(cls, v: Content | None) -> str | None:
        # OpenAI clients may send content as a list of text parts; we join them.
        return v if v is None or isinstance(v, str) else "".join(p.text for p in v)


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content
    name: str | None = Field(default=None, max_length=64)


class UserMessage(_Message):
    role: Literal["user"]
    content: Content
    name: str | None = Field(default=None, max_length=64)


class AssistantTurn(_Message):
    """An earlier assistant message: text, tool calls, or both (content is null beside calls)."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=64)


class ToolMessage(_Message):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(max_length=128)


# One shape per role, as OpenAI's reference declares them.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class FunctionSpec(BaseModel):
    name: FunctionName
    description: str | None = Field(default=None, max_length=8192)
    # The arguments' JSON schema (an object with no properties when absent, as OpenAI reads it).
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaSpec(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(populate_by_name=True)


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


# One shape per type (as OpenAI's reference declares it), so the schema itself says that
# "json_schema" needs its json_schema.
ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    include_usage: bool = False


StopString = Annotated[str, StringConstraints(min_length=1)]


def _token_ids(bias: dict[str, float]) -> dict[str, float]:
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise ValueError(f"logit_bias keys are token ids, not {key!r}")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias values lie in -100..100, not {value}")
    return bias


# Declared with patternProperties, which request generators (schemathesis) honour where pydantic's
# propertyNames is skipped; checked by _token_ids.
LogitBias = Annotated[dict[str, float], AfterValidator(_token_ids), WithJsonSchema({
    "type": "object", "maxProperties": 300, "additionalProperties": False,
    "patternProperties": {"^[0-9]{1,9}$": {"type": "number", "minimum": -100, "maximum": 100}}})]
# Choices of one request (`n`), generated together in the batch.
MAX_CHOICES = 16


class SamplingFields(BaseModel):
    """What both completion routes take to sample a reply."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # Unset: the model's own default (its generation_config.json), as vLLM does.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # Choices generated together (a seed gives choice i the seed + i).
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(default=None,
                                                                                        validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # torch seeds generators with any 64-bit value, signed or not.
    seed: int | None = Field(default=None, ge=-(2 ** 63), le=2 ** 64 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # The GLM and transformers demos' penalty (1 = off); unset: the model's default.
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    # Token id (as a string, as OpenAI sends it) -> a bias added to its logit.
    logit_bias: LogitBias | None = None
    user: str | None = None
    # vLLM extensions, so benchmarks can force equal work.
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_asked(self) -> int | None:
        """How many likeliest tokens to report beside each chosen one; None: no log-probabilities."""
        return None

    def to_sampling_params(self, *, max_tokens: int, defaults: dict[str, float], grammar: Any = None,
                           choice: int = 0) -> Any:
        """The engine's SamplingParams for choice `choice` of this request (max_tokens decided by the
        caller's budget; `defaults` for what the request leaves unset)."""
        # Imported here: the engine package is light, but the gateway has no use for it.
        from .engine.sampling import SamplingParams

        def pick(name: str) -> float:
            value = getattr(self, name)
            return defaults[name] if value is None else value

        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), stop=list(self.stop),
            seed=None if self.seed is None else (self.seed + choice) % 2 ** 64, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, grammar=grammar, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty"),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, logprobs=self.logprobs_asked())


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions on both servers."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, min_length=1, max_length=64)
    # OpenAI's defaults: "auto" when tools are given, else "none".
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_problem(self) -> str | None:
        """What is wrong with the request's tools, if anything. Checked by the model server (a 400
        with code "invalid_tools"): these rules tie fields together, which the schema cannot say."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            return "tool function names must be distinct"
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            return "tool_choice needs tools"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return f"tool_choice names {choice.function.name!r}, which is not among the tools"
        if self.response_format is not None and self.response_format.type != "text" and self.calls_tools():
            return "use either tools or a JSON response_format, not both"
        return None

    def calls_tools(self) -> bool:
        """Whether the reply may (or must) be a tool call."""
        return bool(self.tools) and self.tool_choice != "none"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionRequest(SamplingFields):
    """POST /v1/completions: plain text in, text out, for clients of the older OpenAI route."""

    # One prompt, or several (each its own choice, `index` in the order given).
    prompt: Annotated[str, StringConstraints(min_length=1)] | \
        Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=16)]
    # OpenAI's default for this route.
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first names the call (id, type, name), later ones add
    to its arguments; `index` says which call of the reply it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex


def tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatglm4-web"
    # vLLM's field: the context the model is served with (absent while it loads)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------- the catalogue


class Book(BaseModel):
    """A book of the catalogue: the one shape the database, retrieval, the tasks and the API share."""

    id: int
    title: str
    author: str | None = None
    subjects: list[str] = Field(default_factory=list)
    year: int | None = None
    isbn: str | None = None
    description: str | None = None


MAX_TITLE = 255

# What Python's str.strip() removes, plus the byte-order mark JSON Schema's \s includes: text made
# only of these is blank. One definition for the code and the schema's patterns.
BLANK = ("\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
         "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff")
NOT_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in BLANK) + "]"


def text(limit: int, *, required: bool = False) -> Any:
    """A string field of at most `limit` characters; `required`: it must hold a non-blank character.
    Declared in the schema so /openapi.json says what is accepted; blankness is checked by the
    fields' validators (strip(BLANK)), which say it in words rather than as a regex."""
    extra = {"pattern": NOT_BLANK} if required else None
    return Annotated[str, StringConstraints(max_length=limit), Field(json_schema_extra=extra)]


def _clean_text(value: str | None, limit: int, name: str) -> str | None:
    if value is None:
        return None
    value = value.strip(BLANK)
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return value or None


class BookFields(BaseModel):
    """The optional fields of a book, validated once for every way a book arrives (API, import)."""

    model_config = ConfigDict(extra="forbid")

    author: text(255) | None = None
    subjects: list[text(64)] = Field(default_factory=list, max_length=16)
    year: int | None = Field(default=None, ge=-3000, le=3000)
    isbn: text(32) | None = None
    description: text(4000) | None = None

    @field_validator("author")
    @classmethod
    def _author(cls, v: str | None) -> str | None:
        return _clean_text(v, 255, "author")

    @field_validator("isbn")
    @classmethod
    def _isbn(cls, v: str | None) -> str | None:
        return _clean_text(v, 32, "isbn")

    @field_validator("description")
    @classmethod
    def _description(cls, v: str | None) -> str | None:
        return _clean_text(v, 4000, "description")

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            s = _clean_text(s, 64, "a subject")
            if s and s not in out:
                out.append(s)
        return out


class NewBook(BookFields):
    """A book to add: a title and any of the optional fields (the catalogue gives the id)."""

    title: text(MAX_TITLE, required=True)

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        v = _clean_text(v, MAX_TITLE, "title")
        if not v:
            raise ValueError("title must not be blank")
        return v


class BookPatch(BookFields):
    """PATCH /api/books/<id>: the fields to change; a field sent as null is cleared."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Not nullable: a book keeps a title (left out, it is not changed).
    title: text(MAX_TITLE, required=True) = None

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        return NewBook._title(v)

    @model_validator(mode="after")
    def _something(self) -> "BookPatch":
        if not self.model_fields_set:
            raise ValueError("send at least one field to change")
        if "title" in self.model_fields_set and self.title is None:
            raise ValueError("title cannot be cleared")
        return self

    def changes(self) -> dict[str, Any]:
        """Only the fields the caller sent."""
        return {k: getattr(self, k) for k in self.model_fields_set}


# ---------------------------------------------------------------- gateway's own API


class ApiChatRequest(BaseModel):
    """POST /api/chat: the original demo's shape."""

    prompt: str = Field(min_length=1)
    history: list[ChatMessage] = Field(default_factory=list, max_length=MAX_MESSAGES - 2)
    stream: bool = False
    system: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)


class ApiChatResponse(BaseModel):
    respond: str
    usage: Usage


class BookSearchRequest(BaseModel):
    """POST /api/books/search."""

    query: text(1000, required=True)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip(BLANK):
            raise ValueError("query must not be blank")
        return v.strip(BLANK)


class BookSearchResponse(BaseModel):
    books: list[Book]
    message: str


class BookListResponse(BaseModel):
    books: list[Book]
    total: int
    offset: int
    limit: int


class BookListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Bounded so every store takes it (SQL integers are 64-bit) and JavaScript reads it exactly.
    offset: int = Field(default=0, ge=0, le=2 ** 53 - 1)
    limit: int = Field(default=50, ge=1, le=1000)


class AddBooksRequest(BaseModel):
    """POST /api/books: {"books": [book...]}, or the older {"titles": [str...]}."""

    model_config = ConfigDict(extra="forbid")

    # Exactly one of the two (declared in the schema too); neither is nullable.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["books"]},
                                                                           {"required": ["titles"]}]})

    books: list[NewBook] = Field(default=None, min_length=1, max_length=10000)
    titles: list[text(MAX_TITLE, required=True)] = Field(default=None, min_length=1, max_length=10000)

    @field_validator("titles")
    @classmethod
    def _clean_titles(cls, v: list[str]) -> list[str]:
        cleaned = [t.strip(BLANK) for t in v]
        for i, t in enumerate(cleaned):
            if not t:
                raise ValueError(f"titles[{i}] is blank")
            if len(t) > MAX_TITLE:
                raise ValueError(f"titles[{i}] is longer than {MAX_TITLE} characters")
        return cleaned

    @model_validator(mode="after")
    def _one_of(self) -> "AddBooksRequest":
        if ("books" in self.model_fields_set) == ("titles" in self.model_fields_set):
            raise ValueError('send either "books" or "titles"')
        return self

    def new_books(self) -> list[NewBook]:
        return self.books if self.books is not None else [NewBook(title=t) for t in self.titles]


class AddBooksResponse(BaseModel):
    books: list[Book]


class ImportResponse(BaseModel):
    """POST /api/books/import: records read, books added, records whose title was already there."""

    lines: int
    added: int
    present: int


ComponentState = Literal["ok", "loading", "unavailable"]


class SearchProgress(BaseModel):
    """How far the search index has got: counts only, safe to show anyone."""

    ready: bool
    books: int
    embedded: dict[str, int]
    pending_embeddings: int


class HealthResponse(BaseModel):
    """GET /health. Anyone sees the overall state, each component's state and the search progress;
    `detail` (internal URLs, backends, error text) only a caller with an API key."""

    status: ComponentState
    components: dict[str, ComponentState] = Field(default_factory=dict)
    search: SearchProgress | None = None
    detail: dict[str, Any] | None = None


# ---------------------------------------------------------------- template tasks (model server)


class BookSearchTaskRequest(BaseModel):
    """POST /tasks/book_search on the model server."""

    query: text(1000, required=True)
    books: list[Book] = Field(max_length=100000)


class BookSearchTaskResponse(BaseModel):
    ids: list[int]
    usage: Usage | None = None
