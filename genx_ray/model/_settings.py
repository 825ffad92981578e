"""Configuration from the environment (docs/api.md lists it), validated once at start-up.

A malformed value raises :class:`~genx_ray.model._errors.ConfigError` naming the variable, so a typo
is a clear message when a process starts rather than a stack trace an hour into a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from genx_ray.model._errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
EMBEDDED = "embedded"  # GENX_REDIS_URL=embedded: always start a private Redis
DEFAULT_WORKFLOWS = ("genx_ray.examples",)
_LIMIT_FIELDS = ("concurrency", "rpm", "tpm")


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


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    # True when the user named a Redis: then we never silently start our own instead.
    redis_url_explicit: bool = False
    ray_address: str = "local"
    workflows: tuple[str, ...] = DEFAULT_WORKFLOWS
    api_keys: Mapping[str, str] = field(default_factory=dict)  # bearer key -> tenant
    llm_limits: Mapping[str, LLMLimit] = field(default_factory=dict)
    # Per-tenant quotas on starting runs (tenant name, or "*" for every other tenant).
    tenant_limits: Mapping[str, TenantLimit] = field(default_factory=dict)
    # An LLM concurrency slot's lease (refreshed while its call runs): how soon a crashed
    # holder's slot comes back.
    llm_lease_seconds: int = 60
    # How long a finished run's record, events and journal stay in Redis.
    retention_seconds: int = 7 * 24 * 3600
    # Cap on one run's event stream (approximate MAXLEN); a run that emits more drops its oldest.
    stream_maxlen: int = 100_000
    max_body_bytes: int = 1024 * 1024
    # A run host renews its lease every third of this; a lease this old means the host is gone.
    # Generous: a false crash detection re-runs a step and re-spends LLM money.
    lease_seconds: int = 30
    # Attempts a run gets before a lost host fails it for good.
    max_attempts: int = 3
    # Runs running at once across every worker sharing this Redis (None: no cluster-wide cap).
    max_running: int | None = None
    # The deployment (code version) this process belongs to; see genx_ray.service._worker for the policy.
    deployment: str = "default"
    # Where to POST a signed notice when a run ends (None: no webhooks).
    webhook_url: str | None = None
    webhook_secret: str = ""
    # Ray custom resources each run host asks for (e.g. {"hosts": 0.01} keeps them on the nodes
    # that offer "hosts"): where the long-lived, lightweight run hosts may live.
    host_resources: Mapping[str, float] = field(default_factory=dict)
    # Run tokens (browser-safe, read-only, one run each): the HMAC secret (None: a random one
    # kept in Redis, shared by every gateway on it) and how long a token lives.
    token_secret: str | None = None
    token_ttl: int = 24 * 3600
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # Runs one run host executes at once (each an asyncio task; 1: a process per run, for code
    # that must be isolated).
    host_runs: int = 1000
    # Runs one run host process takes over its life before a fresh one replaces it (1 with
    # host_runs 1: a fresh process for every run, for code that leaves state behind).
    host_max_runs: int = 10_000

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
        env = os.environ if env is None else env
        redis_url = env.get("GENX_REDIS_URL", "").strip()
        return cls(
            redis_url=_redis_url(redis_url) if redis_url else DEFAULT_REDIS_URL,
            redis_url_explicit=bool(redis_url),
            ray_address=_ray_address(env.get("GENX_RAY_ADDRESS", "local").strip() or "local"),
            workflows=_modules(env.get("GENX_WORKFLOWS", "")) or DEFAULT_WORKFLOWS,
            api_keys=_api_keys(env.get("GENX_API_KEYS", "")),
            llm_limits=_llm_limits(env.get("GENX_LLM_LIMITS", "")),
            tenant_limits=_tenant_limits(env.get("GENX_TENANT_LIMITS", "")),
            llm_lease_seconds=_positive_int(env, "GENX_LLM_LEASE_SECONDS", 60),
            retention_seconds=_positive_int(env, "GENX_RETENTION_SECONDS", 7 * 24 * 3600),
            stream_maxlen=_positive_int(env, "GENX_STREAM_MAXLEN", 100_000),
            max_body_bytes=_positive_int(env, "GENX_MAX_BODY_BYTES", 1024 * 1024),
            lease_seconds=_positive_int(env, "GENX_LEASE_SECONDS", 30),
            max_attempts=_positive_int(env, "GENX_MAX_ATTEMPTS", 3),
            max_running=_positive_int(env, "GENX_MAX_RUNNING", 0) or None,
            deployment=env.get("GENX_DEPLOYMENT", "").strip() or "default",
            webhook_url=_webhook_url(env.get("GENX_WEBHOOK_URL", "").strip()),
            webhook_secret=env.get("GENX_WEBHOOK_SECRET", ""),
            host_resources=_resources("GENX_HOST_RESOURCES", env.get("GENX_HOST_RESOURCES", "")),
            token_secret=env.get("GENX_TOKEN_SECRET", "").strip() or None,
            token_ttl=_positive_int(env, "GENX_TOKEN_TTL", 24 * 3600),
            cors_origins=_origins(env.get("GENX_CORS_ORIGINS", "")),
            host_runs=_positive_int(env, "GENX_HOST_RUNS", 1000),
            host_max_runs=_positive_int(env, "GENX_HOST_MAX_RUNS", 10_000),
        )


# Every variable Settings reads: a change to any of them is a new parse for Settings.current().
ENV_VARS = (
    "GENX_REDIS_URL", "GENX_RAY_ADDRESS", "GENX_WORKFLOWS", "GENX_API_KEYS", "GENX_LLM_LIMITS",
    "GENX_LLM_LEASE_SECONDS", "GENX_RETENTION_SECONDS", "GENX_STREAM_MAXLEN",
    "GENX_MAX_BODY_BYTES", "GENX_LEASE_SECONDS", "GENX_MAX_ATTEMPTS", "GENX_MAX_RUNNING",
    "GENX_DEPLOYMENT", "GENX_WEBHOOK_URL", "GENX_WEBHOOK_SECRET", "GENX_HOST_RESOURCES",
    "GENX_HOST_RUNS", "GENX_HOST_MAX_RUNS", "GENX_TOKEN_SECRET", "GENX_TOKEN_TTL",
    "GENX_CORS_ORIGINS", "GENX_TENANT_LIMITS",
)  # fmt: skip
_parsed: dict[tuple[str | None, ...], Settings] = {}


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


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        parsed = urlparse(origin)
        if origin != "*" and (parsed.scheme not in ("http", "https") or not parsed.netloc
                              or parsed.path or parsed.query):  # fmt: skip
            raise ConfigError(
                "GENX_CORS_ORIGINS", f"{origin!r}: expected origins like https://app.example.com"
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
    fields = ("runs_per_minute", "running")
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


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw == "0" and default == 0:  # 0 where it means "none"
        return 0
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(name, f"{raw!r}: expected a positive integer")
    return int(raw)
