"""What a schedule's cron must be at create (issue #23): a tick to come, and no more often than
GENX_SCHEDULE_MIN_INTERVAL; 422 naming ``cron`` otherwise, never a 500."""

from __future__ import annotations

import time

import pytest

from genx_ray.model import ConfigError, InputInvalid, Settings, TenantLimit
from genx_ray.store import check, latest_tick, next_tick


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("0 0 1 1 * 0 2020", "no next tick"),  # a year gone by (7 fields: seconds, year)
        ("0 0 30 2 *", "no next tick"),  # the 30th of February never comes
        ("* * * * * *", "every 1s"),  # 6 fields: every second
        ("*/5 * * * *", None),
        ("0,1 * * * *", None),  # a minute apart: the floor itself
        ("0,1 * * * * 0,30", "every 30s"),
    ],
)
def test_a_cron_is_checked_for_a_next_tick_and_its_interval(cron: str, why: str | None) -> None:
    if why is None:
        check(cron, "UTC", min_interval=60)
        return
    with pytest.raises(InputInvalid) as caught:
        check(cron, "UTC", min_interval=60)
    assert caught.value.message.startswith("cron: ") and why in caught.value.message
    assert caught.value.status_code == 422


def test_a_cron_with_one_tick_left_passes_and_then_has_none() -> None:
    year = time.gmtime().tm_year + 1
    cron = f"30 14 5 12 * 0 {year}"  # the issue's: one tick, next December
    check(cron, "UTC", min_interval=60)
    tick = next_tick(cron, "UTC", time.time())
    assert tick is not None and next_tick(cron, "UTC", tick) is None


def test_the_latest_missed_tick_is_found_without_walking_every_one() -> None:
    now = 1_700_000_000.5
    assert latest_tick("* * * * * *", "UTC", now - 365 * 86400, now) == 1_700_000_000.0
    assert latest_tick("0 0 1 1 * 0 2020", "UTC", 1_577_836_800.0, now) == 1_577_836_800.0


def test_the_new_limits_parse_and_refuse_nonsense() -> None:
    s = Settings.from_env({
        "GENX_TENANT_LIMITS": '{"*": {"schedules": 5}, "acme": {"running": 3}}',
        "GENX_SCHEDULE_MIN_INTERVAL": "10", "GENX_MAX_STREAMS_PER_TENANT": "7",
    })  # fmt: skip
    assert s.tenant_limits["*"] == TenantLimit(schedules=5)
    assert (s.schedule_min_interval, s.max_streams_per_tenant) == (10, 7)
    assert Settings.from_env({}).schedule_min_interval == 60
    assert Settings.from_env({}).max_streams_per_tenant == 1000
    for name, value in [("GENX_TENANT_LIMITS", '{"*": {"schedules": 0}}'),
                        ("GENX_SCHEDULE_MIN_INTERVAL", "-1"),
                        ("GENX_MAX_STREAMS_PER_TENANT", "lots")]:  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})
