"""Gateway configuration: one YAML file, validated by pydantic, overridable from the environment.

Environment overrides use the prefix ``OCTOROUTE_`` and ``__`` between nesting levels, e.g.
``OCTOROUTE_CACHE__URL=redis://cache:6379/0`` or ``OCTOROUTE_EXPERTS__0__BASE_URL=...``.
Values are parsed as YAML scalars, so ``true``, ``12`` and ``null`` mean what they say.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "OCTOROUTE_"
DEFAULT_DEMO_DIR = Path(os.environ.get("OCTOROUTE_HOME", Path.home() / ".cache" / "octoroute")) / "demo-experts"
DEMO_DOMAINS = ("legal", "finance", "math", "code", "general")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(2_000_000, ge=1024, description="Larger request bodies get a 413.")
    max_messages: int = Field(2048, ge=1, description="Longer conversations get a 400.")
    max_tokens_limit: int = Field(32768, ge=1, description="Largest max_tokens a client may ask for.")
    shutdown_grace_s: float = Field(30.0, ge=0, description=(
        "How long SIGTERM waits for in-flight requests; those still running shortly before it "
        "(10%, at most 1 s) end with a 503 error."))
    # Bounds on what a client may send before the app sees a request (gateway/http_limits.py).
    max_header_bytes: int = Field(32768, ge=1024, description="Request line + headers; more gets a 431.")
    max_headers: int = Field(100, ge=8, description="More request headers get a 431.")
    max_url_bytes: int = Field(8192, ge=256, description="Longer request targets get a 414.")
    read_timeout_s: float = Field(30.0, gt=0, description=(
        "Longest time to receive one request (head and body) from its first byte, or from the connection's "
        "opening; past it: 408 and the connection closes (slowloris)."))
    keepalive_s: int = Field(5, ge=1, description="An idle keep-alive connection closes after this long.")
    slow_reader_s: float = Field(10.0, gt=0, description=(
        "Longest a stream waits for a client to take the next chunk (its TCP buffers full); past it the "
        "stream is cut and the expert slot freed."))


class RouterConfig(_Strict):
    kind: Literal["functional_token", "keyword"] = "functional_token"
    path: str | None = Field(None, description="Checkpoint directory; null = the bundled checkpoint.")
    threads: int = Field(1, ge=1, description="torch threads for the router's forward pass.")
    tau: float | None = Field(None, gt=0, le=1, description="Single-expert threshold; null = checkpoint's.")
    mass: float | None = Field(None, gt=0, le=1, description="Cumulative mass for expert sets; null = checkpoint's.")
    history_turns: int = Field(4, ge=0, description="Earlier turns the router may see besides the last user turn.")
    max_batch: int = Field(32, ge=1, description="Most conversations routed in one forward pass.")
    decision_cache_size: int = Field(4096, ge=0, description="Routing decisions kept per conversation text.")


class TimeoutConfig(_Strict):
    """Real bounds from the start of one expert call (gateway/experts/deadlines.py). A fallback expert
    starts its own clock: time to first byte <= first_byte_s (chosen) + first_byte_s (fallback)."""

    connect_s: float = Field(2.0, gt=0, description="One connection attempt.")
    first_byte_s: float = Field(60.0, gt=0, description=(
        "Response headers (non-streamed) or first chunk (streamed), connects and retries included."))
    idle_s: float = Field(30.0, gt=0, description="Longest gap between two streamed chunks (comments don't count).")
    total_s: float = Field(600.0, gt=0, description="The whole answer; a stream past it ends with an error event.")


class BreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    reset_after_s: float = Field(15.0, gt=0, description="Open time before a half-open probe.")


class ExpertConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    backend: Literal["vllm", "local"]
    # vllm backend
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://math:8000/v1")
    model: str | None = Field(None, description="Served model name upstream (vllm) ; defaults to name.")
    api_key_env: str | None = Field(None, description="Environment variable holding the upstream API key.")
    # local backend
    path: str | None = Field(None, description="Local HF model directory (local backend).")
    max_concurrency: int = Field(64, ge=1, description="In-flight requests past which the gateway sends 429.")
    retries: int = Field(2, ge=0, le=10, description="Retries on connect errors / 5xx before the first byte.")
    timeouts: TimeoutConfig = TimeoutConfig()
    breaker: BreakerConfig = BreakerConfig()
    labels: tuple[str, ...] = Field((), description="Router labels this expert answers; default: its name.")

    @model_validator(mode="after")
    def _backend_fields(self) -> ExpertConfig:
        if self.backend == "vllm" and not self.base_url:
            raise ValueError("a vllm expert needs base_url (e.g. http://127.0.0.1:8001/v1)")
        if self.backend == "local" and not self.path:
            raise ValueError("a local expert needs path (a local Hugging Face model directory)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return self

    @property
    def served_model(self) -> str:
        return self.model or self.name

    @property
    def route_labels(self) -> tuple[str, ...]:
        return self.labels or (self.name,)


class CacheConfig(_Strict):
    backend: Literal["memory", "redis", "none"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "octoroute"
    ttl_s: int = Field(3600, ge=1)
    max_entry_bytes: int = Field(1_000_000, ge=1)
    max_entries: int = Field(10_000, ge=1, description="Memory backend: LRU capacity in entries.")
    max_bytes: int = Field(256 * 2**20, ge=1, description="Memory backend: LRU capacity in bytes.")
    timeout_ms: int = Field(250, ge=1, description=(
        "Redis operations slower than this are a bypass, then Redis is skipped for 1 s (both chosen from "
        "measurements: docs/reliability.md)."))
    secret_env: str | None = Field("OCTOROUTE_CACHE_SECRET", description=(
        "Env var with the key that seals entries (HMAC-SHA256); unset: a per-process random key."))
    deterministic_only: bool = Field(True, description="Cache only temperature 0 or seeded requests.")
    shared: bool = Field(False, description="Share entries across API keys (default: one namespace per key).")


class ResponsesConfig(_Strict):
    """Stored responses of /v1/responses (``store: true``): Redis when the cache is Redis, else in memory."""

    ttl_s: int = Field(86400, ge=1, description="How long a stored response (and its chain) can be retrieved.")
    max_entries: int = Field(10_000, ge=1, description="Memory store: most responses kept (LRU).")
    max_bytes: int = Field(64 * 2**20, ge=1, description="Memory store: most bytes kept (LRU).")
    max_entry_bytes: int = Field(4_000_000, ge=1, description="Larger responses (whole conversation) are not stored.")


class AuthConfig(_Strict):
    api_keys_env: str | None = Field("OCTOROUTE_API_KEYS", description="Env var with comma-separated keys.")
    api_keys: tuple[str, ...] = ()
    rate_limit_per_minute: int | None = Field(None, ge=1, description=(
        "Requests per key in any 60 s (moving window; Redis when the cache is Redis, shared by replicas)."))
    rate_limit_outage: Literal["open", "closed"] = Field("open", description=(
        "While Redis is unreachable: open = each replica counts on its own (the limit holds per replica), "
        "closed = refuse with 503."))
    protect_ops: bool = Field(False, description=(
        "Also require a key for /metrics, /ready, /docs, /redoc and /openapi.json (/health stays open)."))


class CorsConfig(_Strict):
    """Cross-origin access for browser apps that call the gateway directly (Starlette's CORSMiddleware)."""

    allow_origins: tuple[str, ...] = Field((), description="Origins allowed, e.g. https://app.example.com, or *; "
                                                            "empty = CORS off.")
    allow_headers: tuple[str, ...] = Field(("*",), description="Request headers a browser may send.")
    max_age_s: int = Field(600, ge=0, description="How long a browser may cache a preflight answer.")


class FusionConfig(_Strict):
    enabled: bool = True
    mode: Literal["weighted", "dlf"] = "weighted"
    auto: bool = Field(True, description="Fuse when the router's policy returns several experts.")
    top_k: int = Field(20, ge=1, le=100)
    large_base: str | None = Field(None, description="dlf: expert name of the large base model L.")
    small_base: str | None = Field(None, description="dlf: expert name of the small base S.")


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(True, alias="json")


def _unique(experts: list[ExpertConfig]) -> list[ExpertConfig]:
    names = [e.name for e in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"expert names must be unique; repeated: {', '.join(dupes)}")
    if "auto" in names or "fusion" in names:
        raise ValueError("'auto' and 'fusion' are reserved model names; rename that expert")
    return experts


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    router: RouterConfig = RouterConfig()
    experts: Annotated[list[ExpertConfig], Field(min_length=1)]
    default_expert: str | None = Field(None, description="Answers router labels no expert claims.")
    fallback_expert: str | None = Field(None, description="Answers when the chosen expert is down.")
    cache: CacheConfig = CacheConfig()
    auth: AuthConfig = AuthConfig()
    fusion: FusionConfig = FusionConfig()
    cors: CorsConfig = CorsConfig()
    responses: ResponsesConfig = ResponsesConfig()
    logging: LoggingConfig = LoggingConfig()

    _check_unique = field_validator("experts")(classmethod(lambda cls, v: _unique(v)))

    @model_validator(mode="after")
    def _known_names(self) -> GatewayConfig:
        names = {e.name for e in self.experts}
        for field in ("default_expert", "fallback_expert"):
            value = getattr(self, field)
            if value is not None and value not in names:
                raise ValueError(f"{field} {value!r} is not an expert; known: {', '.join(sorted(names))}")
        return self

    def expert(self, name: str) -> ExpertConfig:
        return next(e for e in self.experts if e.name == name)


def embedded_default(demo_dir: Path = DEFAULT_DEMO_DIR) -> dict[str, Any]:
    """The config `octoroute serve` uses without --config: bundled router, memory cache, demo experts."""
    return {
        "experts": [
            {"name": d, "backend": "local", "path": str(demo_dir / d), "max_concurrency": 8}
            for d in DEMO_DOMAINS
        ],
        "default_expert": "general",
        "fallback_expert": "general",
        "cache": {"backend": "memory"},
    }


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for key, value in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            nxt_is_index = path[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise ConfigError(f"{key}: index {idx} is past the end of {'.'.join(path[:i]) or 'root'}")
                node = node[idx]
            else:
                node = node.setdefault(part, [] if nxt_is_index else {})
        leaf = path[-1]
        parsed = yaml.safe_load(value) if value else value
        if isinstance(node, list):
            node[int(leaf)] = parsed
        else:
            node[leaf] = parsed
    return raw


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (or the embedded default), apply ``OCTOROUTE_*`` overrides, validate."""
    environ = dict(os.environ if environ is None else environ)
    if path is None:
        raw: Any = embedded_default()
        source = "embedded default"
    else:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = _apply_env(raw, environ)
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc
