"""``genx_ray.llm``: drop-in replacements for the openai SDK's clients.

``AsyncOpenAI`` and ``OpenAI`` are the SDK's own classes with a transport underneath that applies
the cluster-wide limits of ``GENX_LLM_LIMITS``, retries 429/5xx/connection errors (a
``Retry-After`` pauses the budget for every process), falls back along ``fallback`` models behind a
circuit breaker, caches responses when asked (``cache_ttl``), turns streamed chunks into ``output``
events of the running step, adds each call's usage to its run, and opens an OpenTelemetry span
per call with the GenAI semantic-convention attributes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import openai

from genx_ray.llm._batches import ProviderBatches
from genx_ray.llm._bridge import SyncBridge
from genx_ray.llm._policy import Policy
from genx_ray.llm._transport import GenxTransport
from genx_ray.model import ConfigError, Settings

__all__ = ["AsyncOpenAI", "OpenAI", "Policy", "ProviderBatches"]


def _transport(
    fallback: Sequence[str], cache_ttl: float | None, max_attempts: int, policy: Policy | None,
    api_key: Any,
) -> GenxTransport:  # fmt: skip
    if api_key is None and not os.environ.get("OPENAI_API_KEY"):
        raise ConfigError(
            "OPENAI_API_KEY", "no API key: set OPENAI_API_KEY or pass api_key= (genx dev "
            "points it at the built-in simulator)"
        )  # fmt: skip
    policy = policy or Policy(
        fallback=tuple(fallback), cache_ttl=cache_ttl, max_attempts=max_attempts
    )
    return GenxTransport(policy, Settings.current())


class _SharedHttpClient(openai.DefaultAsyncHttpxClient):
    """The HTTP client every ``AsyncOpenAI`` with the same options shares: building one per SDK
    client cost a tenth of a call's CPU when code makes a client per call (common). Closing an
    SDK client must not close it for the others: its connections live in per-loop pools
    (genx_ray.llm._shared) that go with their event loop."""

    async def aclose(self) -> None:
        pass


_http_clients: dict[tuple[Any, ...], _SharedHttpClient] = {}


def _http_client(
    fallback: Sequence[str], cache_ttl: float | None, max_attempts: int, policy: Policy | None,
    api_key: Any,
) -> _SharedHttpClient:  # fmt: skip
    # Settings.current() is one object per distinct environment (and kept): its id names it.
    key = (tuple(fallback), cache_ttl, max_attempts, repr(policy), api_key is None,
           id(Settings.current()))  # fmt: skip
    client = _http_clients.get(key)
    if client is None:
        transport = _transport(fallback, cache_ttl, max_attempts, policy, api_key)
        client = _http_clients[key] = _SharedHttpClient(transport=transport)
    elif api_key is None and not os.environ.get("OPENAI_API_KEY"):
        _transport(fallback, cache_ttl, max_attempts, policy, api_key)  # the same clear error
    return client


@functools.cache
def _platform() -> Any:
    from openai._base_client import get_platform

    return get_platform()


class AsyncOpenAI(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with genx-ray's limits, retries, fallback, cache and events."""

    def __init__(
        self,
        *args: Any,
        fallback: Sequence[str] = (),
        cache_ttl: float | None = None,
        max_attempts: int = 6,
        policy: Policy | None = None,
        **kwargs: Any,
    ) -> None:
        """``fallback``: models to move to, in order, when one fails for good (or its circuit is
        open); ``cache_ttl``: cache responses (not streams) for this many seconds;
        ``max_attempts``: per model, the first try included; ``policy``: all knobs at once."""
        kwargs.setdefault("max_retries", 0)  # retries are ours: cluster-aware, with fallback
        kwargs["http_client"] = _http_client(
            fallback, cache_ttl, max_attempts, policy, kwargs.get("api_key")
        )
        super().__init__(*args, **kwargs)
        if getattr(self, "_platform", False) is None:
            # The SDK looks the platform up on a worker thread at each client's first request
            # (a thread hop per call when a client is made per call); it is the same all along.
            self._platform = _platform()


class OpenAI(openai.OpenAI):
    """``openai.OpenAI`` with the same limits, retries, fallback, cache and events as
    :class:`AsyncOpenAI` (calls run on a private event loop; a stream arrives once complete)."""

    def __init__(
        self,
        *args: Any,
        fallback: Sequence[str] = (),
        cache_ttl: float | None = None,
        max_attempts: int = 6,
        policy: Policy | None = None,
        **kwargs: Any,
    ) -> None:
        transport = _transport(fallback, cache_ttl, max_attempts, policy, kwargs.get("api_key"))
        kwargs.setdefault("max_retries", 0)
        kwargs["http_client"] = openai.DefaultHttpxClient(transport=SyncBridge(transport))
        super().__init__(*args, **kwargs)
