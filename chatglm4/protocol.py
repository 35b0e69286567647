"""Every wire type of the gateway, the model server and the example client, in one place.

Requests validate themselves (pydantic); the same models produce /openapi.json. The chat types follow
the OpenAI chat-completions protocol, with vLLM's `ignore_eos` and `min_tokens` extensions."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------- OpenAI chat completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    # OpenAI clients may send content as a list of text parts; we join them.
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v: str | list[TextPart]) -> str:
        return v if isinstance(v, str) else "".join(p.text for p in v)


class JsonSchemaSpec(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions on both servers."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    # Accepted for compatibility with OpenAI clients; they do not change sampling here.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
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
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatglm4-web"


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


# ---------------------------------------------------------------- gateway's own API

Title = str


class ApiChatRequest(BaseModel):
    """POST /api/chat: the original demo's shape."""

    prompt: str = Field(min_length=1)
    history: list[ChatMessage] = Field(default_factory=list)
    stream: bool = False
    system: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)


class ApiChatResponse(BaseModel):
    respond: str
    usage: Usage


class BookOut(BaseModel):
    id: int
    title: str


class BookSearchRequest(BaseModel):
    """POST /api/books/search."""

    query: str = Field(min_length=1, max_length=1000)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query must not be blank")
        return v.strip()


class BookSearchResponse(BaseModel):
    books: list[BookOut]
    message: str


class BookListResponse(BaseModel):
    books: list[BookOut]
    total: int
    offset: int
    limit: int


class BookListQuery(BaseModel):
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=50, ge=1, le=1000)


class AddBooksRequest(BaseModel):
    """POST /api/books."""

    titles: list[str] = Field(min_length=1, max_length=10000)

    @field_validator("titles")
    @classmethod
    def _clean_titles(cls, v: list[str]) -> list[str]:
        cleaned = [t.strip() for t in v]
        for i, t in enumerate(cleaned):
            if not t:
                raise ValueError(f"titles[{i}] is blank")
            if len(t) > 255:
                raise ValueError(f"titles[{i}] is longer than 255 characters")
        return cleaned


class AddBooksResponse(BaseModel):
    books: list[BookOut]


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    detail: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------- template tasks (model server)


class BookSearchTaskRequest(BaseModel):
    """POST /tasks/book_search on the model server."""

    query: str = Field(min_length=1, max_length=1000)
    books: list[BookOut] = Field(max_length=100000)


class BookSearchTaskResponse(BaseModel):
    ids: list[int]
    usage: Usage | None = None
