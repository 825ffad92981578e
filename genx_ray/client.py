"""A small client of the genx-ray HTTP API, used by the CLI (and handy in scripts).

``events()`` follows a run's SSE stream and, when the connection drops, reconnects with
``Last-Event-ID`` until the terminal event: the caller sees every event once, in order.
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from genx_ray.model import GenxError
from genx_ray.store import StreamEntry

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(GenxError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.error_code = status, code


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = (base_url or os.environ.get("GENX_API_URL") or DEFAULT_API_URL).rstrip("/")
        key = api_key or os.environ.get("GENX_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": resp.text[:500]}
            raise ApiError(resp.status_code, err["code"], err["message"])
        return resp.json()

    def start(
        self,
        workflow: str,
        input: Any = None,
        *,
        wait: float | None = None,
        key: str | None = None,
        delay_seconds: float | None = None,
        start_at: str | None = None,
        tags: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        """Start a run (later, with ``delay_seconds`` or an RFC 3339 ``start_at``; ``tags`` to
        find it by; ``priority`` 1 most urgent .. 5, default 3); returns the run object, with
        its ``stream_token`` (read-only, this run only: for a browser, see :meth:`viewer_url`)."""
        params = {"wait": wait} if wait else None
        headers = {"Idempotency-Key": key} if key else None
        body: dict[str, Any] = {"input": input}
        if tags:
            body["tags"] = tags
        if delay_seconds is not None:
            body["delay_seconds"] = delay_seconds
        if priority is not None:
            body["priority"] = priority
        if start_at is not None:
            body["start_at"] = start_at
        resp = self.http.post(
            f"/v1/workflows/{workflow}/runs", json=body, params=params, headers=headers
        )
        result: dict[str, Any] = self._check(resp)
        return result

    def send_input(self, run_id: str, input: Any, input_id: str | None = None) -> dict[str, Any]:
        """Answer a run waiting for input (:class:`ApiError` 422 when it does not fit, 409 when
        the run does not wait for input)."""
        body = {"input": input, **({"input_id": input_id} if input_id else {})}
        result: dict[str, Any] = self._check(self.http.post(f"/v1/runs/{run_id}/input", json=body))
        return result

    def create_schedule(
        self, workflow: str, cron: str, input: Any = None, timezone: str = "UTC",
        *, overlap: str = "skip",
    ) -> dict[str, Any]:  # fmt: skip
        body = {"workflow": workflow, "cron": cron, "input": input, "timezone": timezone,
                "overlap": overlap}  # fmt: skip
        result: dict[str, Any] = self._check(self.http.post("/v1/schedules", json=body))
        return result

    def schedules(self, *, page_size: int = 500) -> list[dict[str, Any]]:
        """Every schedule of the caller's tenant (the pages followed, ``page_size`` each)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page_size}
        while True:
            resp = self.http.get("/v1/schedules", params=params)
            out += self._check(resp)
            cursor = resp.headers.get("Genx-Next-Cursor")
            if not cursor:
                return out
            params = {"limit": page_size, "cursor": cursor}

    def pause_schedule(self, schedule_id: str, paused: bool = True) -> dict[str, Any]:
        """Pause a schedule (its ticks start no run), or resume it (``paused=False``)."""
        action = "pause" if paused else "resume"
        result: dict[str, Any] = self._check(
            self.http.post(f"/v1/schedules/{schedule_id}/{action}")
        )
        return result

    def delete_schedule(self, schedule_id: str) -> None:
        resp = self.http.delete(f"/v1/schedules/{schedule_id}")
        if resp.status_code >= 400:
            self._check(resp)

    def viewer_url(self, run: dict[str, Any]) -> str:
        """The address of a run's viewer page, with the run's token when ``run`` has one."""
        url = f"{self.base_url}/ui/runs/{run['id']}"
        return f"{url}?token={run['stream_token']}" if run.get("stream_token") else url

    def get(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.get(f"/v1/runs/{run_id}"))
        return result

    def list(self, **filters: Any) -> dict[str, Any]:
        """A page of runs, newest first: ``workflow``, ``status``, ``tag`` ("key:value", or a
        list of them), ``created_after``, ``created_before`` (RFC 3339), ``limit``, ``cursor``."""
        params = {k: v for k, v in filters.items() if v is not None}
        result: dict[str, Any] = self._check(self.http.get("/v1/runs", params=params))
        return result

    def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.post(f"/v1/runs/{run_id}/cancel"))
        return result

    def steps(self, run_id: str) -> builtins.list[dict[str, Any]]:
        """The run's steps in the order its code called them (a map as one entry)."""
        result: dict[str, Any] = self._check(self.http.get(f"/v1/runs/{run_id}/steps"))
        return list(result["steps"])

    def rerun(
        self,
        run_id: str,
        *,
        from_step: str | None = None,
        input: Any = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """A new run of the run's workflow, reusing the steps it completed before
        ``from_step`` (none: from the start), with ``input`` instead of its own if given."""
        headers = {"Idempotency-Key": key} if key else None
        body = {"from_step": from_step, "input": input}
        resp = self.http.post(f"/v1/runs/{run_id}/rerun", json=body, headers=headers)
        result: dict[str, Any] = self._check(resp)
        return result

    def bulk(
        self,
        action: str,
        filter: dict[str, Any],
        *,
        dry_run: bool = False,
        limit: int | None = None,
        key: str | None = None,
        **more: Any,
    ) -> dict[str, Any]:
        """``cancel`` or ``rerun`` the runs ``filter`` chooses (``workflow``, ``status``,
        ``tag``, ``created_after``, ``created_before``, ``ids``); ``more``: ``from`` for a
        rerun. Returns ``{"matched", "done", "dry_run", "runs"}``."""
        body: dict[str, Any] = {"filter": filter, "dry_run": dry_run, **more}
        if limit is not None:
            body["limit"] = limit
        headers = {"Idempotency-Key": key} if key else None
        timeout = httpx.Timeout(300, connect=10)  # thousands of runs take a while
        resp = self.http.post(f"/v1/runs/bulk/{action}", json=body, headers=headers,
                              timeout=timeout)  # fmt: skip
        result: dict[str, Any] = self._check(resp)
        return result

    def cluster(self) -> dict[str, Any]:
        """Workers and run hosts, the run queue, the LLM budgets in use."""
        result: dict[str, Any] = self._check(self.http.get("/v1/cluster"))
        return result

    def events(
        self, run_id: str, after: str | None = None, *, retry_for: float = 60.0
    ) -> Iterator[StreamEntry]:
        """Every event after ``after`` until the terminal one, resuming across dropped
        connections (for up to ``retry_for`` seconds without progress)."""
        last = after
        last_progress = time.monotonic()
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/runs/{run_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30, read=60),
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        self._check(resp)
                    for entry in _parse_sse(resp.iter_lines()):
                        last, last_progress = entry.id, time.monotonic()
                        yield entry
                        if entry.terminal:
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if time.monotonic() - last_progress > retry_for:
                    raise
                time.sleep(0.5)


def _parse_sse(lines: Iterator[str]) -> Iterator[StreamEntry]:
    entry_id, kind, data = "", "", list[str]()
    for line in lines:
        if not line:
            if data and entry_id:
                text = "\n".join(data)
                yield StreamEntry(entry_id, kind or json.loads(text)["type"], text)
            entry_id, kind, data = "", "", []
        elif line.startswith("id:"):
            entry_id = line[3:].strip()
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
