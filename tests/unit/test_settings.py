from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from genx_ray.model import (
    DEFAULT_REDIS_URL,
    ENV_VARS,
    ConfigError,
    LLMLimit,
    Settings,
    settings_module,
)


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.redis_url == DEFAULT_REDIS_URL and not s.redis_url_explicit
    assert s.ray_address == "local" and s.api_keys == {} and s.llm_limits == {}
    assert s.host_runs == 1000 and s.host_max_runs == 10_000


class _Recording(Mapping[str, str]):
    """An empty environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_the_cached_parse_watches_every_variable_the_settings_read() -> None:
    env = _Recording()
    Settings.from_env(env)
    assert env.asked == set(ENV_VARS)


def test_settings_are_parsed_once_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENX_MAX_ATTEMPTS", "7")
    first = Settings.current()
    assert first.max_attempts == 7 and Settings.current() is first  # no second parse
    monkeypatch.setenv("GENX_MAX_ATTEMPTS", "8")
    assert Settings.current().max_attempts == 8  # a changed variable is seen
    monkeypatch.setenv("GENX_MAX_ATTEMPTS", "7")
    assert Settings.current() is first
    assert len(settings_module._parsed) >= 2


def test_values_are_parsed() -> None:
    s = Settings.from_env({
        "GENX_REDIS_URL": "redis://h:1/2",
        "GENX_RAY_ADDRESS": "10.0.0.1:6380",
        "GENX_WORKFLOWS": "a.b, c",
        "GENX_API_KEYS": "k1-0123456789abcdef:acme, k2-0123456789abcdef:globex",
        "GENX_LLM_LIMITS": '{"gpt-4o*": {"concurrency": 64, "rpm": 5000}, "*": {"tpm": 9}}',
        "GENX_HOST_MAX_RUNS": "1",
    })  # fmt: skip
    assert s.redis_url_explicit and s.workflows == ("a.b", "c") and s.host_max_runs == 1
    assert s.api_keys == {"k1-0123456789abcdef": "acme", "k2-0123456789abcdef": "globex"}
    assert s.llm_limits == {"gpt-4o*": LLMLimit(64, 5000, None), "*": LLMLimit(tpm=9)}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENX_REDIS_URL", "http://nope"),
        ("GENX_RAY_ADDRESS", "somewhere"),
        ("GENX_WORKFLOWS", "not a module"),
        ("GENX_API_KEYS", "justakey"),
        ("GENX_LLM_LIMITS", "{not json"),
        ("GENX_LLM_LIMITS", '{"*": {"rpm": -1}}'),
        ("GENX_LLM_LIMITS", '{"*": {"rpn": 5}}'),
        ("GENX_LLM_LIMITS", "[1]"),
        ("GENX_MAX_BODY_BYTES", "lots"),
        ("GENX_HOST_MAX_RUNS", "0"),
        ("GENX_HOST_RUNS", "-3"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.setting == name and name in str(info.value)
