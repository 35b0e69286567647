"""Every setting of both servers, declared once as data: its flag, its environment variable, its
default and one line of help. Command line over environment over default; values are validated
before anything heavy (the model, the database) is touched."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

# How forced tool calls (tool_choice "required" or a named tool) reach a remote engine: "native" sends
# tool_choice as it is (vLLM and SGLang enforce it with their guided decoding); "schema" asks for the
# calls as a JSON answer under response_format, for engines that enforce a JSON schema but not
# tool_choice (llama.cpp's server, for a model whose template has no tools).
ENGINE_TOOL_CALL_MODES = ("native", "schema")


def setting(default: Any, env: str | None, help: str, *, flag: str | None = None) -> Any:
    """A dataclass field carrying its environment variable and help line."""
    return field(default=default, metadata={"env": env, "help": help, "flag": flag})


def _shutdown_grace() -> Any:
    return setting(30.0, "SHUTDOWN_GRACE_SECONDS",
                   "on SIGTERM or Ctrl-C, seconds to let requests in flight finish before exiting")


def _search_candidates() -> Any:
    # Both servers read it (the gateway retrieves this many, the model server narrows to this many
    # when handed more), so it is declared here once.
    return setting(8, "SEARCH_CANDIDATES", "books retrieval shows the model per search")


@dataclass(frozen=True)
class ModelServerConfig:
    model: str | None = setting(None, "MODEL", "local model folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    engine_url: str | None = setting(None, "ENGINE_URL", "delegate generation to the OpenAI-compatible server at this URL (vLLM, SGLang, llama.cpp, another model server) and load no model")
    engine_model: str | None = setting(None, "ENGINE_MODEL", "with engine_url: the model id to ask the engine for; default: the first its /v1/models lists")
    engine_tool_calls: str = setting("native", "ENGINE_TOOL_CALLS", "with engine_url: how forced tool calls (tool_choice required or a named tool) reach the engine: native (tool_choice as is: vLLM, SGLang) or schema (a JSON schema of the calls under response_format: llama.cpp's server)")
    tokenizer: str | None = setting(None, "TOKENIZER", "with engine_url: local folder of the served model's tokenizer, for exact prompt lengths; default: the engine's /tokenize, else an estimate")
    host: str = setting("127.0.0.1", "MODEL_SERVER_HOST", "address to bind")
    port: int = setting(8001, "MODEL_SERVER_PORT", "port to bind")
    dtype: str = setting("auto", "DTYPE", "auto (bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, float32 on other CPUs), float32, bfloat16 or float16")
    max_memory: str | None = setting(None, "MAX_MEMORY", "per-device memory cap for device_map=auto, e.g. '0=20GiB,1=22GiB,cpu=0'")
    quantize: str | None = setting(None, "QUANTIZE", "int8 or int4 weight-only quantization after loading (CPU: torch's int8/int4 kernels, GPU: torchao); 8bit and 4bit are aliases; unset = full precision")
    gpus: str | None = setting(None, "GPUS", "comma-separated GPU indices to place the model on, e.g. '0,1'; default: every visible GPU")
    max_context: int = setting(0, "MAX_CONTEXT", "context length in tokens; 0 = the model's own")
    default_max_tokens: int = setting(512, "DEFAULT_MAX_TOKENS", "max_tokens when a request names none")
    default_temperature: float | None = setting(None, "DEFAULT_TEMPERATURE", "temperature when a request names none; default: the model's generation_config.json, else 0.7 (the embedded model: 0, greedy)")
    max_batch: int = setting(32, "MAX_BATCH", "sequences decoded together (continuous batching)")
    prefix_cache_tokens: int = setting(8192, "PREFIX_CACHE_TOKENS", "prompt-prefix tokens whose key/value cache is kept for reuse; 0 = off")
    kv_cache_tokens: int = setting(0, "KV_CACHE_TOKENS", "ceiling of the running batch's key/value cache, in token slots (rows × width, each row reserved to its prompt + max_tokens): requests past it wait their turn; 0 = the larger of the context and 65536")
    prefill_chunk_tokens: int = setting(64, "PREFILL_CHUNK_TOKENS", "prompt tokens prefilled per step while streams decode, so a long prompt pauses them a chunk at a time (CPU: tens, GPU: hundreds); 0 = whole prompts at once")
    prefill_chunk_seconds: float = setting(0.25, "PREFILL_CHUNK_SECONDS", "the time a chunk may take: chunks hold fewer tokens than prefill_chunk_tokens where a token costs more (deep into a long prompt, on a slow machine), sized from the timing of earlier forwards; 0 = always prefill_chunk_tokens")
    compile: str = setting("off", "COMPILE", "on: torch.compile the decode step (compiled while the server starts: 6-8 minutes for the embedded model on 2 CPU cores; there one stream decoded 1.3-1.7x faster); off: eager")
    max_waiting: int = setting(64, "MAX_WAITING", "requests allowed to wait for a batch slot; past that, 503 at once")
    search_candidates: int = _search_candidates()
    served_model_name: str | None = setting(None, "SERVED_MODEL_NAME", "model id reported by /v1/models; default: from the model path")
    # Each streamed reply holds a thread for its whole generation: keep more than max_batch + max_waiting.
    threads: int = setting(128, "MODEL_SERVER_THREADS", "HTTP worker threads")
    shutdown_grace: float = _shutdown_grace()


@dataclass(frozen=True)
class GatewayConfig:
    host: str = setting("127.0.0.1", "GATEWAY_HOST", "address to bind")
    port: int = setting(8000, "GATEWAY_PORT", "port to bind")
    model_server: str = setting("http://127.0.0.1:8001", "MODEL_SERVER_URL", "model server URL, or several separated by commas")
    database_url: str = setting("sqlite:///data/catalogue.db", "DATABASE_URL", "SQLAlchemy URL of the catalogue (MySQL: mysql+pymysql://user:pass@host:3306/glm4)")
    api_keys: str | None = setting(None, "API_KEYS", "comma-separated keys; when set, the API requires 'Authorization: Bearer KEY'")
    upstream_timeout: float = setting(120.0, "UPSTREAM_TIMEOUT", "seconds to wait for a model server's answer before a 503")
    connect_timeout: float = setting(2.0, "UPSTREAM_CONNECT_TIMEOUT", "seconds to wait for a model server connection")
    max_body_bytes: int = setting(2 * 1024 * 1024, "MAX_BODY_BYTES", "largest request body accepted (413 above)")
    rate_limit: str | None = setting(None, "RATE_LIMIT", "per-client limit on API calls, e.g. '60/minute'; unset = none")
    search_candidates: int = _search_candidates()
    embedding_models: str = setting("e5,use", "EMBEDDING_MODELS", "embedding models fused into book search (e5, use); empty = lexical only")
    embedding_cache: str = setting("data/embeddings.sqlite", "EMBEDDING_CACHE", "file keeping book embeddings across restarts; empty = memory only")
    search_floor: float | None = setting(None, "SEARCH_FLOOR", "fused score under which a search answers 书籍不存在; default: sqrt(2 ln books), calibrated on the library eval set")
    search_margin: float = setting(1.0, "SEARCH_MARGIN", "books within this much of the best fused score are candidates")
    search_model_choice: str = setting("on", "SEARCH_MODEL_CHOICE", "on: the model chooses among the candidates; off: retrieval's candidates are the answer")
    catalogue_poll: float = setting(1.0, "CATALOGUE_POLL_SECONDS", "how often search reads the catalogue's change log (other processes' writes)")
    threads: int = setting(128, "GATEWAY_THREADS", "HTTP worker threads (each streamed reply holds one)")
    shutdown_grace: float = _shutdown_grace()


class ConfigError(ValueError):
    """A setting has a value that cannot work."""


C = TypeVar("C")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{f.name}: {raw!r} is not a number") from None
    return raw


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per setting of `cls`, help showing env and default."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        parser.add_argument(
            _flag(f), dest=f.name, default=None, metavar=f.name.upper(),
            help=f"{f.metadata['help']} (env {env}; default {f.default!r})",
        )
    return parser


def load(cls: type[C], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         description: str = "") -> C:
    """The settings of `cls` from the command line, then the environment, then defaults; validated."""
    environ = os.environ if environ is None else environ
    args = build_parser(cls, description).parse_args(argv)
    values = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None and f.metadata.get("env"):
            raw = environ.get(f.metadata["env"]) or None
        values[f.name] = f.default if raw is None else _convert(f, raw)
    config = cls(**values)
    validate(config)
    return config


def validate(config: Any) -> None:
    """Raises ConfigError naming the first setting whose value cannot work."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "port" and not 0 <= value <= 65535:
            raise ConfigError(f"port {value} is out of range")
        if f.name in ("threads", "default_max_tokens", "search_candidates", "max_waiting", "max_batch",
                      "max_body_bytes") and value < 1:
            raise ConfigError(f"{f.name} must be at least 1")
        if f.name in ("upstream_timeout", "connect_timeout", "catalogue_poll") and value <= 0:
            raise ConfigError(f"{f.name} must be positive")
        if f.name == "shutdown_grace" and value < 0:
            raise ConfigError("shutdown_grace must be 0 or more seconds")
        if f.name == "engine_tool_calls" and value not in ENGINE_TOOL_CALL_MODES:
            raise ConfigError(f"engine_tool_calls {value!r}: choose {' or '.join(ENGINE_TOOL_CALL_MODES)}")
        if f.name == "kv_cache_tokens" and value < 0:
            raise ConfigError("kv_cache_tokens must be 0 (automatic) or positive")
        if f.name == "max_context" and value < 0:
            raise ConfigError("max_context must be 0 (the model's) or positive")
        if f.name in ("prefill_chunk_tokens", "prefill_chunk_seconds") and not value >= 0:
            raise ConfigError(f"{f.name} must be 0 (off) or positive")
    if isinstance(config, ModelServerConfig):
        if config.compile not in ("on", "off"):
            raise ConfigError(f"compile {config.compile!r}: choose on or off")
        if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {config.dtype!r}: choose auto, float32, bfloat16 or float16")
        from .engine.modelload import ModelLoadError, check_quantize, parse_gpus

        try:  # the loader's own checks, run before anything heavy
            check_quantize(config.quantize)
            parse_gpus(config.gpus)
        except ModelLoadError as exc:
            raise ConfigError(str(exc)) from None
        if config.engine_url and config.model:
            raise ConfigError("give model or engine_url, not both")
        if config.engine_url and not config.engine_url.startswith(("http://", "https://")):
            raise ConfigError(f"engine URL {config.engine_url!r} must start with http:// or https://")
        if config.tokenizer and not os.path.isdir(config.tokenizer):
            raise ConfigError(f"tokenizer folder {config.tokenizer!r} does not exist")
        if config.model and not os.path.exists(config.model):
            raise ConfigError(f"model path {config.model!r} does not exist (download it with download.py)")
    if isinstance(config, GatewayConfig):
        if config.search_model_choice not in ("on", "off"):
            raise ConfigError(f"search_model_choice {config.search_model_choice!r}: choose on or off")
        from .embedding import MODELS

        for name in embedding_models(config):
            if name not in MODELS:
                raise ConfigError(f"embedding model {name!r}: choose from {', '.join(MODELS)}")
        if not model_server_urls(config):
            raise ConfigError("model_server: give at least one URL")
        for url in model_server_urls(config):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"model server URL {url!r} must start with http:// or https://")


def model_server_urls(config: GatewayConfig) -> list[str]:
    return [u.strip().rstrip("/") for u in config.model_server.split(",") if u.strip()]


def embedding_models(config: GatewayConfig) -> list[str]:
    return [m.strip() for m in config.embedding_models.split(",") if m.strip()]


def api_keys(config: GatewayConfig) -> list[str]:
    return [k.strip() for k in (config.api_keys or "").split(",") if k.strip()]


def settings_table(cls: type) -> list[tuple[str, str, Any, str]]:
    """(flag, env, default, help) rows, for the README and its drift test."""
    return [(_flag(f), f.metadata.get("env") or "", f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]


def markdown() -> str:
    """The settings of both servers as README tables."""
    out = []
    for title, cls in (("Model server (`LLMapis.py`)", ModelServerConfig), ("Gateway (`serveapi.py`)", GatewayConfig)):
        out += [f"**{title}**", "", "| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
        for flag, env, default, help_ in settings_table(cls):
            shown = "—" if default is None else f"`{default}`"
            out.append(f"| `{flag}` | `{env}` | {shown} | {help_.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
