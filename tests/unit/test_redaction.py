"""Redaction (issue #23, point 6): masking before any cut, credentials of every shape, secret
settings of every name, and JSON that stays JSON."""

from __future__ import annotations

import base64
import json

import pytest

from genx_ray.model import REDACTED, ErrorInfo, ProgressEvent, dump_event, redact, redact_json

SECRET = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("GENX_REDIS_URL", "rediss://default:r3dis-pa55word@cache.internal:6380/0")


def test_a_secret_across_the_cut_leaks_no_prefix() -> None:
    message = "x" * 1990 + SECRET  # the key starts 10 characters before the 2,000 cut
    info = ErrorInfo.from_exception(ValueError(message))
    assert "sk-live" not in info.message and info.message.endswith(REDACTED)
    assert len(info.message) <= 2000
    try:
        raise ValueError("y" * 5000 + SECRET)
    except ValueError as exc:
        traced = ErrorInfo.from_exception(exc)
    assert traced.traceback is not None and "sk-live" not in traced.traceback


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Authorization: bearer abc.def-123", "Authorization: bearer " + REDACTED),
        ("AUTHORIZATION: BEARER abc.def-123", "AUTHORIZATION: BEARER " + REDACTED),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer " + REDACTED),
        ("Authorization: Basic " + base64.b64encode(b"alice:s3cret!").decode(),
         "Authorization: Basic " + REDACTED),
        ("a basic English sentence, Basic information", None),  # not credentials
        ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY in a message", REDACTED + " in a message"),
        ("connect to rediss://default:r3dis-pa55word@cache.internal:6380/0 failed",
         f"connect to rediss://default:{REDACTED}@cache.internal:6380/0 failed"),
        ("https://bob:hunter2@example.com/x", f"https://bob:{REDACTED}@example.com/x"),
        ("AUTH failed: r3dis-pa55word", f"AUTH failed: {REDACTED}"),  # the password alone too
        ("see https://example.com/a:b and gxt_abc.def", f"see https://example.com/a:b and gxt_{REDACTED}"),
    ],
)  # fmt: skip
def test_every_shape_of_credential_is_masked(text: str, kept: str | None) -> None:
    assert redact(text) == (text if kept is None else kept)


def test_json_stays_json_with_every_secret_masked_inside_its_strings() -> None:
    quoted = 'pa"ss\\word-0123456789'  # a secret that JSON escapes
    payload = {"k": SECRET, "nested": [{"auth": "Bearer xyz\\"}], "q": f"?token=abc\"{quoted}",
               "url": "redis://:pw-0123456789@h/0", "n": 5}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTHER_PASSWORD", quoted)
        masked = redact_json(json.dumps(payload))
    back = json.loads(masked)  # still JSON, same shape
    assert set(back) == set(payload) and back["n"] == 5
    assert back["k"] == REDACTED and SECRET not in masked and quoted[5:] not in masked
    assert "xyz" not in masked and "pw-0123456789" not in masked


def test_every_event_a_run_emits_is_masked_as_it_is_made() -> None:
    event = ProgressEvent(run_id="r", kind="note", data={"said": f"my key is {SECRET}"})
    assert SECRET not in dump_event(event) and REDACTED in dump_event(event)
