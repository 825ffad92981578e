"""Keys, ids and event ids: the shapes the data model relies on."""

from __future__ import annotations

import time

import pytest

from genx_ray.model import UserError, is_run_id, new_run_id
from genx_ray.store import check_event_id, id_key, keys


def test_every_key_of_a_run_shares_its_slot() -> None:
    run_id = new_run_id()
    tags = {
        k.split("{", 1)[1].split("}", 1)[0] for k in (*keys.expiring(run_id), keys.lease(run_id))
    }
    assert tags == {run_id}
    assert keys.run_id_of(keys.events(run_id)) == run_id


def test_an_llm_budget_s_keys_share_one_slot_whatever_its_glob() -> None:
    budget = keys.llm_budget("gpt-{4o}*:x")
    tags = {k.split("{", 1)[1].split("}", 1)[0] for k in budget.all}
    assert len(tags) == 1 and "4o" not in tags.pop()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("acme", "wf:eu"), ("acme:wf:eu", None)),  # the colon that used to leak
        (("acme", "wf"), ("acme:wf", None)),
        (("a{b}", None), ("a%7Bb%7D", None)),
        (("a%3A", None), ("a:", None)),
    ],
)
def test_names_from_users_cannot_make_the_same_key(
    a: tuple[str, str | None], b: tuple[str, str | None]
) -> None:
    assert keys.run_index(*a) != keys.run_index(*b)
    assert "{" not in keys.run_index("x{y}z", "w{v}")  # no hash tag smuggled in


def test_idempotency_keys_are_hashed_and_scoped() -> None:
    k = keys.idempotency("acme", "echo", "a" * 256)
    assert len(k) < 100 and k != keys.idempotency("acme", "echo2", "a" * 256)
    assert keys.idempotency("acme:echo", "x", "k") != keys.idempotency("acme", "echo:x", "k")


def test_run_ids_sort_by_time_and_are_recognised() -> None:
    ids = [new_run_id(now=t) for t in (time.time() - 10, time.time())]
    assert ids == sorted(ids) and all(is_run_id(i) for i in ids)
    assert not is_run_id("run_short") and not is_run_id(ids[0].lower())


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "1-2-3", "-1", "1-", "9" * 30, "1-x", "1\n", "99999999999999999999-0",
     "1-99999999999999999999"],
)  # fmt: skip
def test_malformed_event_ids(bad: str) -> None:
    with pytest.raises(UserError):
        check_event_id(bad)


def test_valid_event_ids_and_their_order() -> None:
    assert check_event_id("1795689293631-0") == "1795689293631-0"
    assert check_event_id("18446744073709551615-18446744073709551615")
    assert sorted(["10-0", "9-5", "10-1"], key=id_key) == ["9-5", "10-0", "10-1"]
