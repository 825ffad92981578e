"""Configuration from the environment (docs/api.md lists it), validated once at start-up.

A malformed value raises :class:`~genx_ray.model.ConfigError` naming the variable, so a typo
is a clear message when a process starts rather than a stack trace an hour into a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from genx_ray.model._errors import ConfigError

T = TypeVar("T")
# A value pydantic-settings hands over as the variable's text: its parser here decodes it (JSON
# or a list), so a malformed value gets this module's message naming the variable.
NoDecoded = Annotated[T, NoDecode]
# Set while Settings.from_env parses a given mapping: the process environment is not read then.
_given_only: ContextVar[bool] = ContextVar("genx_settings_given_only", default=False)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
EMBEDDED = "embedded"  # GENX_REDIS_URL=embedded: always start a private Redis
DEFAULT_WORKFLOWS = ("genx_ray.examples",)
_LIMIT_FIELDS = ("concurrency", "rpm", "tpm")
DEFAULT_SCHEDULES = 100  # schedules a tenant may have when GENX_TENANT_LIMITS says nothing
MIN_TOKEN_SECRET = 32  # bytes of GENX_TOKEN_SECRET, at least
MIN_API_KEY = 16  # characters of each key of GENX_API_KEYS, at least


@dataclass(frozen=True, slots=True)
class LLMLimit:
    """Cluster-wide budget for the models matching one glob; ``None`` means unlimited."""

    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class TenantLimit:
    """What one tenant may start through the API; ``None`` means unlimited."""

    runs_per_minute: int | None = None  # a token bucket: bursts up to this, refilled evenly
    running: int | None = None  # runs started and not finished (queued, running or waiting)
    schedules: int | None = None  # schedules it may have (None: "*"'s, else DEFAULT_SCHEDULES)
    # Its share of the run queue against other tenants' at one priority (None: "*"'s, else 1).
    weight: int | None = None
    # Its own LLM budget, every process of the cluster sharing it, beside GENX_LLM_LIMITS' per
    # model (a call waits for both): tokens per minute, and calls at once.
    llm_tokens_per_minute: int | None = None
    llm_concurrency: int | None = None


def _var(name: str, default: Any, **kw: Any) -> Any:
    """A setting read from the environment variable ``name``."""
    return Field(default, validation_alias=name, **kw)


class Settings(BaseSettings):
    """Every setting, from ``GENX_*`` variables (pydantic-settings reads them), validated once
    when a process starts: a malformed value is a :class:`ConfigError` naming its variable.
    Build one with :meth:`current` (this process's environment, cached), :meth:`from_env` (a
    mapping), or by field name in tests (``Settings(lease_seconds=1)``)."""

    model_config = SettingsConfigDict(
        frozen=True, case_sensitive=True, populate_by_name=True, extra="ignore",
        arbitrary_types_allowed=True,
    )  # fmt: skip

    redis_url: str = _var("GENX_REDIS_URL", DEFAULT_REDIS_URL)
    # True when the user named a Redis: then we never silently start our own instead.
    redis_url_explicit: bool = False
    ray_address: str = _var("GENX_RAY_ADDRESS", "local")
    workflows: NoDecoded[tuple[str, ...]] = _var("GENX_WORKFLOWS", DEFAULT_WORKFLOWS)
    api_keys: NoDecoded[Mapping[str, str]] = _var("GENX_API_KEYS", {})  # bearer key -> tenant
    llm_limits: NoDecoded[Mapping[str, LLMLimit]] = _var("GENX_LLM_LIMITS", {})
    # Per-tenant quotas on starting runs (tenant name, or "*" for every other tenant).
    tenant_limits: NoDecoded[Mapping[str, TenantLimit]] = _var("GENX_TENANT_LIMITS", {})
    # An LLM concurrency slot's lease (refreshed while its call runs): how soon a crashed
    # holder's slot comes back.
    llm_lease_seconds: int = _var("GENX_LLM_LEASE_SECONDS", 60)
    # How long a finished run's record, events and journal stay in Redis.
    retention_seconds: int = _var("GENX_RETENTION_SECONDS", 7 * 24 * 3600)
    # Cap on one run's event stream (approximate MAXLEN); a run that emits more drops its oldest.
    stream_maxlen: int = _var("GENX_STREAM_MAXLEN", 100_000)
    max_body_bytes: int = _var("GENX_MAX_BODY_BYTES", 1024 * 1024)
    # A run host renews its lease every third of this; a lease this old means the host is gone.
    # Generous: a false crash detection re-runs a step and re-spends LLM money.
    lease_seconds: int = _var("GENX_LEASE_SECONDS", 30)
    # Attempts a run gets before a lost host fails it for good.
    max_attempts: int = _var("GENX_MAX_ATTEMPTS", 3)
    # Runs running at once across every worker sharing this Redis (None: no cluster-wide cap).
    max_running: int | None = _var("GENX_MAX_RUNNING", None)
    # The deployment (code version) this process belongs to; see the worker for the policy.
    deployment: str = _var("GENX_DEPLOYMENT", "default")
    # Where to POST a signed notice when a run ends (None: no webhooks).
    webhook_url: str | None = _var("GENX_WEBHOOK_URL", None)
    webhook_secret: str = _var("GENX_WEBHOOK_SECRET", "")
    # Ray custom resources each run host asks for (e.g. {"hosts": 0.01} keeps them on the nodes
    # that offer "hosts"): where the long-lived, lightweight run hosts may live.
    host_resources: NoDecoded[Mapping[str, float]] = _var("GENX_HOST_RESOURCES", {})
    # Run tokens (browser-safe, read-only, one run each): the HMAC secret (None: a random one
    # kept in Redis, shared by every gateway on it) and how long a token lives.
    token_secret: str | None = _var("GENX_TOKEN_SECRET", None)
    token_ttl: int = _var("GENX_TOKEN_TTL", 24 * 3600)
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: NoDecoded[tuple[str, ...]] = _var("GENX_CORS_ORIGINS", ())
    # Runs one run host executes at once (each an asyncio task; 1: a process per run, for code
    # that must be isolated).
    host_runs: int = _var("GENX_HOST_RUNS", 1000)
    # Runs one run host process takes over its life before a fresh one replaces it (1 with
    # host_runs 1: a fresh process for every run, for code that leaves state behind).
    host_max_runs: int = _var("GENX_HOST_MAX_RUNS", 10_000)
    # A schedule's cron may not tick more often than this (seconds).
    schedule_min_interval: int = _var("GENX_SCHEDULE_MIN_INTERVAL", 60)
    # Event streams (SSE or NDJSON) open at once per tenant, per gateway.
    max_streams_per_tenant: int = _var("GENX_MAX_STREAMS_PER_TENANT", 1000)
    # A map with llm="batch" waits this long before it first looks at its batch, then twice as
    # long each time, up to batch_poll_max_ms (milliseconds).
    batch_poll_ms: int = _var("GENX_BATCH_POLL_MS", 5000)
    batch_poll_max_ms: int = _var("GENX_BATCH_POLL_MAX_MS", 300_000)

    # -- parsing: each variable's own rules and messages ------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _named_redis(cls, data: Any) -> Any:
        if (
            isinstance(data, dict) and "redis_url_explicit" not in data
            and str(data.get("GENX_REDIS_URL") or "").strip()
        ):  # fmt: skip
            data = {**data, "redis_url_explicit": True}
        return data

    @model_validator(mode="after")
    def _signed_webhooks(self) -> Settings:
        # An empty key signs webhooks anyone can forge: a receiver could not trust any of them.
        if self.webhook_url and not self.webhook_secret:
            raise ConfigError(
                "GENX_WEBHOOK_SECRET",
                "GENX_WEBHOOK_URL is set but no secret signs the webhooks (receivers could not "
                "tell them from forgeries); set GENX_WEBHOOK_SECRET to a long random string",
            )
        return self

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, value: Any, info: ValidationInfo) -> Any:
        """A variable's text, parsed by the rules of its field (values given by field name, as
        tests do, pass as they are)."""
        field = info.field_name
        if not isinstance(value, str) or field is None or field in _VERBATIM:
            return value
        text = value.strip()
        if not text:
            return cls.model_fields[field].default
        if field not in _PARSERS:
            return text
        name, parse = _PARSERS[field]
        return parse(name, text)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:  # fmt: skip
        """The process environment, under what the caller gives; only what :meth:`from_env` is
        given when it is given a mapping."""
        return (init_settings,) if _given_only.get() else (init_settings, env_settings)

    @classmethod
    def current(cls) -> Settings:
        """The settings of this process's environment, parsed once per distinct value of the
        variables they read (a changed variable is seen; an unchanged one costs a lookup)."""
        seen = tuple(os.environ.get(name) for name in ENV_VARS)
        settings = _parsed.get(seen)
        if settings is None:
            settings = _parsed[seen] = cls.from_env()
        return settings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse ``env`` (the process environment by default); :class:`ConfigError` names the
        first malformed variable."""
        if env is None:
            return cls()
        token = _given_only.set(True)
        try:
            given: dict[str, Any] = {name: env[name] for name in ENV_VARS if name in env}
            return cls(**given)
        finally:
            _given_only.reset(token)


def _redis_url(value: str) -> str:
    if value == EMBEDDED:
        return value
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            "GENX_REDIS_URL",
            f"{value!r} is not a redis://, rediss:// or unix:// URL (or 'embedded')",
        )
    return value


def _resources(name: str, value: str) -> dict[str, float]:
    if not value.strip():
        return {}
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in raw.values()
    ):
        raise ConfigError(
            name, 'expected an object of resource name -> positive amount, e.g. {"hosts": 0.01}'
        )
    return {str(k): float(v) for k, v in raw.items()}


# An origin and nothing else: it goes into headers (CORS, a CSP's frame-ancestors), where a ';' or
# a space would add a directive or a source of its own.
_ORIGIN = re.compile(r"https?://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                "GENX_CORS_ORIGINS",
                f"{origin!r}: expected origins like https://app.example.com (a scheme, a host, "
                "a port maybe; no path, no ';', no spaces), comma-separated, or *",
            )
    return origins


def _webhook_url(value: str) -> str | None:
    if not value:
        return None
    if urlparse(value).scheme not in ("http", "https"):
        raise ConfigError("GENX_WEBHOOK_URL", f"{value!r} is not an http(s) URL")
    return value


def _ray_address(value: str) -> str:
    if value in ("local", "auto") or value.startswith("ray://"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("GENX_RAY_ADDRESS", f"{value!r}: expected 'local', 'auto' or host:port")
    return value


def _modules(value: str) -> tuple[str, ...]:
    mods = tuple(m.strip() for m in value.split(",") if m.strip())
    for mod in mods:
        if not all(part.isidentifier() for part in mod.split(".")):
            raise ConfigError("GENX_WORKFLOWS", f"{mod!r} is not a module name")
    return mods


TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        key, sep, tenant = (p.strip() for p in item.partition(":"))
        if not sep or not key or not tenant:
            raise ConfigError("GENX_API_KEYS", "expected key:tenant pairs, comma-separated")
        if not TENANT_NAME.fullmatch(tenant):
            # The key itself is never repeated in an error: errors may be logged.
            raise ConfigError(
                "GENX_API_KEYS", f"tenant {tenant!r}: a tenant name is 1 to 64 of A-Z a-z 0-9 _ . -"
            )
        if len(key) < MIN_API_KEY:
            raise ConfigError(
                "GENX_API_KEYS",
                f"the key of tenant {tenant!r} is shorter than {MIN_API_KEY} characters: a key "
                "that short can be guessed; use a long random one",
            )
        if key in keys and keys[key] != tenant:
            raise ConfigError("GENX_API_KEYS", f"one key is given for two tenants ({tenant!r})")
        keys[key] = tenant
    return keys


def _llm_limits(value: str) -> dict[str, LLMLimit]:
    if not value.strip():
        return {}
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError("GENX_LLM_LIMITS", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("GENX_LLM_LIMITS", "expected an object of model glob -> limits")
    limits: dict[str, LLMLimit] = {}
    for glob, spec in raw.items():
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(
                "GENX_LLM_LIMITS", f"{glob!r}: expected an object like {{'rpm': 600}}"
            )
        unknown = set(spec) - set(_LIMIT_FIELDS)
        if unknown:
            raise ConfigError(
                "GENX_LLM_LIMITS",
                f"{glob!r}: unknown field(s) {sorted(unknown)}; use {_LIMIT_FIELDS}",
            )
        for name, number in spec.items():
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise ConfigError(
                    "GENX_LLM_LIMITS", f"{glob!r}.{name}: expected a positive integer"
                )
        limits[glob] = LLMLimit(**spec)
    return limits


def _tenant_limits(value: str) -> dict[str, TenantLimit]:
    name = "GENX_TENANT_LIMITS"
    example = '{"*": {"runs_per_minute": 600, "running": 1000}, "acme": {"running": 5000}}'
    if not value.strip():
        return {}
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(name, f"not JSON ({exc}); e.g. {example}") from None
    if not isinstance(raw, dict):
        raise ConfigError(name, f"expected an object of tenant -> limits, e.g. {example}")
    fields = ("runs_per_minute", "running", "schedules", "weight", "llm_tokens_per_minute",
              "llm_concurrency")  # fmt: skip
    limits: dict[str, TenantLimit] = {}
    for tenant, spec in raw.items():
        if tenant != "*" and not TENANT_NAME.fullmatch(tenant):
            raise ConfigError(name, f"{tenant!r} is not a tenant name (or '*' for the others)")
        if not isinstance(spec, dict) or not spec or set(spec) - set(fields):
            raise ConfigError(name, f"{tenant!r}: expected an object with {fields}")
        for field_name, number in spec.items():
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise ConfigError(name, f"{tenant!r}.{field_name}: expected a positive integer")
        limits[tenant] = TenantLimit(**spec)
    return limits


def _token_secret(value: str) -> str:
    if len(value.encode()) < MIN_TOKEN_SECRET:
        # The secret itself is never repeated in an error: errors may be logged.
        raise ConfigError(
            "GENX_TOKEN_SECRET",
            f"{len(value.encode())} bytes; run tokens signed with a secret under "
            f"{MIN_TOKEN_SECRET} bytes can be forged by guessing it: use a long random string",
        )
    return value


def _positive(name: str, text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(name, f"{text!r}: expected a positive integer")
    return int(text)


def _positive_or_none(name: str, text: str) -> int | None:
    """A positive integer, or 0 where it means "none"."""
    return None if text == "0" else _positive(name, text)


Parse = Callable[[str, str], Any]
# field -> (its variable, how its text is parsed); blank text means the field's default.
_PARSERS: dict[str, tuple[str, Parse]] = {
    "redis_url": ("GENX_REDIS_URL", lambda _, v: _redis_url(v)),
    "ray_address": ("GENX_RAY_ADDRESS", lambda _, v: _ray_address(v)),
    "workflows": ("GENX_WORKFLOWS", lambda _, v: _modules(v) or DEFAULT_WORKFLOWS),
    "api_keys": ("GENX_API_KEYS", lambda _, v: _api_keys(v)),
    "llm_limits": ("GENX_LLM_LIMITS", lambda _, v: _llm_limits(v)),
    "tenant_limits": ("GENX_TENANT_LIMITS", lambda _, v: _tenant_limits(v)),
    "llm_lease_seconds": ("GENX_LLM_LEASE_SECONDS", _positive),
    "retention_seconds": ("GENX_RETENTION_SECONDS", _positive),
    "stream_maxlen": ("GENX_STREAM_MAXLEN", _positive),
    "max_body_bytes": ("GENX_MAX_BODY_BYTES", _positive),
    "lease_seconds": ("GENX_LEASE_SECONDS", _positive),
    "max_attempts": ("GENX_MAX_ATTEMPTS", _positive),
    "max_running": ("GENX_MAX_RUNNING", _positive_or_none),
    "deployment": ("GENX_DEPLOYMENT", lambda _, v: v),
    "webhook_url": ("GENX_WEBHOOK_URL", lambda _, v: _webhook_url(v)),
    "host_resources": ("GENX_HOST_RESOURCES", _resources),
    "token_secret": ("GENX_TOKEN_SECRET", lambda _, v: _token_secret(v)),
    "token_ttl": ("GENX_TOKEN_TTL", _positive),
    "cors_origins": ("GENX_CORS_ORIGINS", lambda _, v: _origins(v)),
    "host_runs": ("GENX_HOST_RUNS", _positive),
    "host_max_runs": ("GENX_HOST_MAX_RUNS", _positive),
    "schedule_min_interval": ("GENX_SCHEDULE_MIN_INTERVAL", _positive),
    "max_streams_per_tenant": ("GENX_MAX_STREAMS_PER_TENANT", _positive),
    "batch_poll_ms": ("GENX_BATCH_POLL_MS", _positive),
    "batch_poll_max_ms": ("GENX_BATCH_POLL_MAX_MS", _positive),
}
_VERBATIM = frozenset({"webhook_secret"})  # a secret is taken as given, spaces included

# Every variable Settings reads: a change to any of them is a new parse for Settings.current().
ENV_VARS: tuple[str, ...] = tuple(
    str(f.validation_alias) for f in Settings.model_fields.values() if f.validation_alias
)
_parsed: dict[tuple[str | None, ...], Settings] = {}
