"""The API's OpenAPI document, as typed as the API really is.

The routes read their bodies themselves (one error format, limits checked before parsing), so
FastAPI alone would describe them loosely. This completes its document: a route per registered
workflow (``POST /v1/workflows/<name>/runs``, its input model as the request body and its output
model in the run it returns), the request and response bodies of every route, every status each
returns with the real error body (``{"error": {"code", "message"}}``), the two media types of the
events endpoint, and the bearer scheme (API keys; run tokens where a route takes them).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from gateway.sse import NDJSON, SSE
from genx_ray.flow import Registry, Workflow
from genx_ray.model import (
    EVENT_TYPES,
    MAX_TAG_KEY,
    MAX_TAG_VALUE,
    MAX_TAGS,
    Event,
    Run,
    RunStatus,
    Settings,
    StepView,
)
from genx_ray.store import MAX_DELAY_SECONDS, Schedule

ERROR = {"$ref": "#/components/schemas/Error"}
RUN = {"$ref": "#/components/schemas/Run"}
STATUS_TEXT = {
    400: "malformed request (bad JSON, unknown fields, a bad parameter)",
    401: "no credential, or one not accepted here",
    404: "no such resource for this tenant",
    405: "method not allowed (see Allow)",
    409: "the request contradicts the current state",
    413: "the body is over GENX_MAX_BODY_BYTES",
    422: "the input does not fit its schema (the message names the field)",
    429: "over the tenant's quota (see Retry-After)",
    503: "Redis does not answer",
}
HIDDEN = {"tenant", "origin", "parent_step", "traceparent"}  # Run fields the API never shows
# An event id as in SSE "id:" lines: <ms>-<seq>. The API takes each part up to 2**64 - 1; the
# document says 19 digits, which a regular expression can say.
EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,19}(-[0-9]{1,19})?$",
            "description": "an event id (SSE id:); the events after it"}  # fmt: skip


def install(app: FastAPI, registry: Registry, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, registry, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI, registry: Registry, settings: Settings) -> dict[str, Any]:
    keys_on = bool(settings.api_keys)
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_common_schemas())
    spec["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http", "scheme": "bearer",
            "description": "An API key (GENX_API_KEYS). The routes that read one run also take "
            "a run token (a run's stream_token, or POST /v1/runs/{id}/tokens), as the bearer "
            "credential or ?token=.",
        }
    }  # fmt: skip
    paths: dict[str, Any] = spec["paths"]
    generic = paths.pop("/v1/workflows/{name}/runs", {}).get("post")
    for wf in registry:
        paths[f"/v1/workflows/{wf.name}/runs"] = {"post": _start_run(wf, generic, schemas)}
    _bodies(paths, registry, settings)
    _links(paths)
    for path, item in paths.items():
        for method, op in item.items():
            _responses(path, method, op, keys_on)
    return spec


def _common_schemas() -> dict[str, Any]:
    run = Run.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    defs = run.pop("$defs", {})
    for name in HIDDEN:
        run["properties"].pop(name, None)
    run["required"] = [r for r in run.get("required", []) if r not in HIDDEN]
    event = TypeAdapter(Event).json_schema(ref_template="#/components/schemas/{model}")
    defs.update(event.pop("$defs", {}))
    schedule = Schedule.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    defs.update(schedule.pop("$defs", {}))
    schedule["properties"].pop("tenant", None)
    step = StepView.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    defs.update(step.pop("$defs", {}))
    step.pop("required", None)
    step["required"] = ["id", "component", "kind", "parent", "status", "attempts", "started_at",
                        "finished_at", "cached", "reused", "error"]  # fmt: skip
    return {
        **defs,
        "Run": run,
        "RunCreated": {"allOf": [RUN, {"type": "object", "properties": {
            "stream_token": {"type": "string", "description": "a read-only run token"}}}]},
        "RunPage": {
            "type": "object", "required": ["runs", "next_cursor"],
            "properties": {"runs": {"type": "array", "items": RUN},
                           "next_cursor": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        },
        "Event": {**event, "description": "An event of a run's stream (SSE data / NDJSON line)"},
        "Step": {**step, "description": "A step of a run; a map's counts only on a map"},
        "Steps": {"type": "object", "required": ["steps"], "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}}}},
        "RunCounts": {"type": "object", "required": ["counts", "complete"], "properties": {
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "complete": {"type": "boolean"}}},
        "BulkResult": {
            "type": "object", "required": ["matched", "done", "dry_run", "runs"],
            "properties": {
                "matched": {"type": "integer"}, "done": {"type": "integer"},
                "dry_run": {"type": "boolean"},
                "runs": {"type": "array", "items": {"type": "object", "required": ["id", "done"],
                         "properties": {"id": {"type": "string"}, "done": {"type": "boolean"},
                                        "status": {"type": "string"},
                                        "from_step": {"type": ["string", "null"]},
                                        "rerun_id": {"type": ["string", "null"]},
                                        "error": {"type": "object"}}}},
            },
        },
        "Cluster": {"type": "object", "required": ["workers", "queue", "leases", "llm_budgets"],
                    "properties": {"workers": {"type": "array", "items": {"type": "object"}},
                                   "queue": {"type": "object", "required": ["depth",
                                                                            "oldest_age_seconds"]},
                                   "leases": {"type": "integer"},
                                   "llm_budgets": {"type": "array", "items": {"type": "object"}}}},
        "Schedule": schedule,
        "Workflow": {
            "type": "object", "required": ["name", "description", "input_schema", "output_schema"],
            "properties": {"name": {"type": "string"},
                           "description": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                           "input_schema": {"type": "object"}, "output_schema": {"type": "object"}},
        },
        "Token": {
            "type": "object", "required": ["token", "expires_at", "scope"],
            "properties": {"token": {"type": "string"},
                           "expires_at": {"type": "string", "format": "date-time"},
                           "scope": {"type": "string", "enum": ["read", "answer"]}},
        },
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                                     "properties": {"code": {"type": "string"},
                                                    "message": {"type": "string"}}}},
        },
    }  # fmt: skip


def _hoist(schema: dict[str, Any], prefix: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema made valid inside the document: its ``$defs`` moved to the components
    (named ``<prefix><name>``) and its ``$ref``\\ s pointed there."""
    schema = copy.deepcopy(schema)
    defs = schema.pop("$defs", {})

    def repoint(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                node["$ref"] = f"#/components/schemas/{prefix}{ref.removeprefix('#/$defs/')}"
            for value in node.values():
                repoint(value)
        elif isinstance(node, list):
            for value in node:
                repoint(value)
        return node

    for name, sub in defs.items():
        schemas[f"{prefix}{name}"] = repoint(sub)
    return dict(repoint(schema))


def _start_run(wf: Workflow[Any, Any], generic: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    prefix = "".join(p.capitalize() for p in wf.name.replace("-", "_").split("_")) or "Workflow"
    input_schema = _hoist(wf.input_schema(), f"{prefix}_", schemas)
    output_schema = _hoist(wf.output_schema(), f"{prefix}_", schemas)
    run = copy.deepcopy(schemas["Run"])
    run["properties"]["input"] = input_schema
    run["properties"]["output"] = {"anyOf": [output_schema, {"type": "null"}]}
    run["title"] = f"{prefix}Run"
    schemas[f"{prefix}Run"] = {"allOf": [run, {"type": "object", "properties": {
        "stream_token": {"type": "string", "description": "a read-only run token"}}}]}  # fmt: skip
    ref = {"$ref": f"#/components/schemas/{prefix}Run"}
    op = copy.deepcopy(generic) if generic else {}
    op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "name"]
    op["operationId"] = f"start_{wf.name.replace('-', '_')}"
    op["summary"] = f"Start a run of {wf.name}"
    op["description"] = (wf.description or "") + (
        "\n\nAsync by default (202 + the run); ?wait=S waits up to S seconds (200 + the "
        "finished run); Accept: text/event-stream streams the new run's events."
    )
    op["tags"] = ["workflows"]
    op["requestBody"] = {
        "required": bool(wf.input_schema().get("required")),
        "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "required": ["input"] if wf.input_schema().get("required") else [],
            "properties": {
                "input": input_schema,
                "start_at": {"type": ["string", "null"], "format": "date-time",
                             "description": "start then (RFC 3339, within a year)"},
                "delay_seconds": {"type": ["number", "null"], "minimum": 0,
                                  "maximum": MAX_DELAY_SECONDS,
                                  "description": "start this many seconds from now"},
                "priority": {"type": ["integer", "null"], "minimum": 1, "maximum": 5,
                             "description": "1 most urgent .. 5; default 3"},
                "tags": {"type": ["object", "null"], "maxProperties": MAX_TAGS,
                         "propertyNames": {"minLength": 1, "maxLength": MAX_TAG_KEY,
                                           "pattern": "^[^:\\u0000-\\u001f\\u007f-\\u009f]+$"},
                         "additionalProperties": {"type": "string", "maxLength": MAX_TAG_VALUE},
                         "description": "key: value labels to find the run by (?tag=key:value)"},
            },
        }}},
    }  # fmt: skip
    created = {"application/json": {"schema": ref}}
    op["responses"] = {
        "202": {"description": "created (or scheduled); still going", "content": {
            **created, SSE: {"schema": {"type": "string"}}}},
        "200": {"description": "finished within ?wait, or an idempotent replay",
                "content": created},
    }  # fmt: skip
    return dict(op)


_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, with a zone"}
_TAG = {"type": "string", "pattern": f"^[^:]{{1,{MAX_TAG_KEY}}}:.{{0,{MAX_TAG_VALUE}}}$",
        "description": "key:value"}  # fmt: skip
# A bulk action's filter: at least one field; each given must hold.
_FILTER: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "workflow": {"type": "string", "minLength": 1},
        "status": {"type": "string", "enum": [s.value for s in RunStatus]},
        "tag": {"anyOf": [_TAG, {"type": "array", "items": _TAG, "minItems": 1,
                                 "maxItems": MAX_TAGS}]},
        "created_after": _TIME, "created_before": _TIME,
        "ids": {"type": "array", "minItems": 1, "maxItems": 1000,
                "items": {"type": "string", "pattern": "^run_[0-9A-HJKMNP-TV-Z]{26}$"}},
    },
}  # fmt: skip
_BULK: dict[str, Any] = {
    "type": "object", "required": ["filter"], "additionalProperties": False,
    "properties": {"filter": _FILTER, "dry_run": {"type": "boolean", "default": False},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 10_000,
                             "default": 10_000}},
}  # fmt: skip

# Request bodies the routes read themselves: (path, method) -> schema.
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/runs/{run_id}/rerun", "post"): {
        "type": "object", "additionalProperties": False,
        "properties": {"from_step": {"type": ["string", "null"],
                                     "description": "a step id of the run (its steps); null: "
                                                    "from the start"},
                       "input": {"description": "a new input (the workflow's schema); null: "
                                                "the run's own"}},
    },
    ("/v1/runs/bulk/cancel", "post"): _BULK,
    ("/v1/runs/bulk/rerun", "post"): {**_BULK, "properties": {
        **_BULK["properties"],
        "from": {"type": "string", "enum": ["failed_step", "start"], "default": "failed_step"}}},
    ("/v1/runs/{run_id}/input", "post"): {
        "type": "object", "required": ["input"], "additionalProperties": False,
        "properties": {"input": {"description": "fits the input.requested event's schema"},
                       "input_id": {"type": "string"}},
    },
    ("/v1/runs/{run_id}/tokens", "post"): {
        "type": "object", "additionalProperties": False,
        "properties": {"ttl": {"type": ["integer", "null"], "minimum": 1},
                       "scope": {"type": "string", "enum": ["read", "answer"]}},
    },
    ("/v1/schedules", "post"): {
        "type": "object", "required": ["workflow", "cron"], "additionalProperties": False,
        "properties": {"workflow": {"type": "string"},
                       "cron": {"type": "string", "example": "*/5 * * * *",
                                "pattern": "^[0-9*/,-]+( [0-9*/,-]+){4,5}$",
                                "description": "5 fields (minute first), or 6 (seconds last)"},
                       "input": {"description": "each run's input"},
                       "timezone": {"type": "string", "default": "UTC", "example": "Europe/Paris",
                                    "pattern": "^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$"},
                       "overlap": {"type": "string", "enum": ["skip", "allow"], "default": "skip",
                                   "description": "skip: no new run while the previous one is "
                                                  "open; allow: a run at every tick"}},
    },
}  # fmt: skip

# What each route answers when it succeeds: (path, method) -> (status, schema).
_OK: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("/v1/workflows", "get"): ("200", {"type": "array",
                                       "items": {"$ref": "#/components/schemas/Workflow"}}),
    ("/v1/runs", "get"): ("200", {"$ref": "#/components/schemas/RunPage"}),
    ("/v1/runs/{run_id}", "get"): ("200", RUN),
    ("/v1/runs/{run_id}/cancel", "post"): ("200", RUN),
    ("/v1/runs/{run_id}/input", "post"): ("200", RUN),
    ("/v1/runs/{run_id}/tokens", "post"): ("200", {"$ref": "#/components/schemas/Token"}),
    ("/v1/schedules", "post"): ("201", {"$ref": "#/components/schemas/Schedule"}),
    ("/v1/schedules", "get"): ("200", {"type": "array",
                                       "items": {"$ref": "#/components/schemas/Schedule"}}),
    ("/v1/schedules/{schedule_id}", "get"): ("200", {"$ref": "#/components/schemas/Schedule"}),
    ("/v1/schedules/{schedule_id}/pause", "post"): ("200",
                                                    {"$ref": "#/components/schemas/Schedule"}),
    ("/v1/schedules/{schedule_id}/resume", "post"): ("200",
                                                     {"$ref": "#/components/schemas/Schedule"}),
    ("/v1/runs/{run_id}/steps", "get"): ("200", {"$ref": "#/components/schemas/Steps"}),
    ("/v1/runs/counts", "get"): ("200", {"$ref": "#/components/schemas/RunCounts"}),
    ("/v1/runs/bulk/cancel", "post"): ("200", {"$ref": "#/components/schemas/BulkResult"}),
    ("/v1/runs/bulk/rerun", "post"): ("200", {"$ref": "#/components/schemas/BulkResult"}),
    ("/v1/cluster", "get"): ("200", {"$ref": "#/components/schemas/Cluster"}),
}  # fmt: skip


def _bodies(paths: dict[str, Any], registry: Registry, settings: Settings) -> None:
    bodies = copy.deepcopy(_BODIES)
    ttl = bodies[("/v1/runs/{run_id}/tokens", "post")]["properties"]["ttl"]
    ttl["maximum"] = settings.token_ttl
    names = sorted(wf.name for wf in registry)
    bodies[("/v1/schedules", "post")]["properties"]["workflow"] = {"type": "string", "enum": names}
    for (path, method), schema in bodies.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            op["requestBody"] = {
                "required": path not in ("/v1/runs/{run_id}/tokens", "/v1/runs/{run_id}/rerun"),
                "content": {"application/json": {"schema": schema}},
            }
    for item in paths.values():  # the filters of GET /v1/runs and /v1/runs/counts
        for op in item.values():
            for param in op.get("parameters", []):
                if param["in"] == "query" and param["name"] == "tag":
                    param["schema"] = {"type": "array", "items": _TAG, "maxItems": MAX_TAGS}
                elif param["in"] == "query" and param["name"] in (
                    "created_after",
                    "created_before",
                ):
                    param["schema"] = _TIME
    for (path, method), (status, schema) in _OK.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            op["responses"] = {
                **{k: v for k, v in op["responses"].items() if not k.startswith("2")},
                status: {"description": "OK", "content": {"application/json": {"schema": schema}}},
            }
    rerun = paths.get("/v1/runs/{run_id}/rerun", {}).get("post")
    if rerun is not None:
        made = {"application/json": {"schema": {"$ref": "#/components/schemas/RunCreated"}}}
        rerun["responses"] = {
            **{k: v for k, v in rerun["responses"].items() if not k.startswith("2")},
            "202": {"description": "the rerun, queued", "content": made},
            "200": {"description": "an idempotent replay: the rerun made before",
                    "content": made},
        }  # fmt: skip
    cancel = paths.get("/v1/runs/{run_id}/cancel", {}).get("post")
    if cancel is not None:
        cancel["responses"]["202"] = {
            "description": "asked to stop: it will within a second",
            "content": {"application/json": {"schema": RUN}},
        }
    events = paths.get("/v1/runs/{run_id}/events", {}).get("get")
    if events is not None:
        for param in events.get("parameters", []):
            if param["name"].lower() in ("after", "last-event-id"):
                param["schema"] = EVENT_ID
        frame = {
            "type": "object", "required": ["id", "event", "data"],
            "description": "one SSE event: its id, its type, and the event as JSON",
            "properties": {
                "id": {"type": "string"},
                "event": {"type": "string", "enum": list(EVENT_TYPES)},
                "data": {"type": "string", "contentMediaType": "application/json",
                         "contentSchema": {"$ref": "#/components/schemas/Event"}},
            },
        }  # fmt: skip
        line = {"type": "string", "description": "one JSON event a line, with its id"}
        events["responses"]["200"] = {
            "description": "the run's events, from the start or after an id, then live; "
            "the stream ends after the terminal event",
            "content": {SSE: {"schema": frame}, NDJSON: {"schema": line}},
        }
    delete = paths.get("/v1/schedules/{schedule_id}", {}).get("delete")
    if delete is not None:
        delete["responses"] = {"204": {"description": "deleted"}}


def _links(paths: dict[str, Any]) -> None:
    """What a created run or schedule leads to (clients and fuzzers follow these)."""
    run_id = {"run_id": "$response.body#/id"}
    to_run = {
        name: {"operationId": op_id, "parameters": run_id}
        for name, op_id in (("GetRun", "get_run"), ("Events", "run_events"),
                            ("Cancel", "cancel_run"), ("MintToken", "mint_token"),
                            ("SendInput", "send_input"), ("Steps", "run_steps"),
                            ("Rerun", "rerun_run"))
    }  # fmt: skip
    for path, item in paths.items():
        if path.startswith("/v1/workflows/") and "post" in item:
            for status in ("200", "202"):
                item["post"]["responses"][status]["links"] = to_run
    listed = paths.get("/v1/schedules", {}).get("get")
    if listed is not None:
        listed["responses"]["200"]["headers"] = {
            "Genx-Next-Cursor": {"schema": {"type": "string"},
                                 "description": "the next page's cursor; absent on the last"},
            "Link": {"schema": {"type": "string"}, "description": '<...>; rel="next"'},
        }  # fmt: skip
    created = paths.get("/v1/schedules", {}).get("post")
    if created is not None:
        created["responses"]["201"]["links"] = {
            name: {"operationId": op_id, "parameters": {"schedule_id": "$response.body#/id"}}
            for name, op_id in (("GetSchedule", "get_schedule"), ("Delete", "delete_schedule"),
                                ("Pause", "pause_schedule"), ("Resume", "resume_schedule"))
        }  # fmt: skip


def _responses(path: str, method: str, op: dict[str, Any], keys_on: bool) -> None:
    """Every error status the route answers, with the real error body, and its security."""
    responses = op.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's validation body: never sent (400 instead)
    open_route = path in ("/healthz", "/metrics") or path.startswith("/ui/")
    codes = {405}
    if path == "/healthz":
        codes |= {503}
    else:
        codes |= {400, 503}
        if not open_route:
            codes.add(401)
        if "{" in path or path.startswith("/v1/workflows/") or path == "/v1/schedules":
            codes.add(404)
        if method == "post":
            codes |= {413}
        if (method == "post" and path.endswith(("/runs", "/input", "/rerun"))) or (
            path == "/v1/schedules"
        ):
            codes.add(422)
        if path.endswith(("/cancel", "/input", "/rerun")) or path.startswith(
            ("/v1/workflows/", "/v1/runs/bulk/")
        ):
            codes.add(409)
        if method == "post" and (
            path.startswith(("/v1/workflows/", "/v1/schedules")) or path.endswith("/rerun")
        ):
            codes.add(429)  # quota_exceeded (runs, reruns, schedules), stream_limit (an SSE start)
        if path == "/v1/runs/{run_id}/events":
            codes.add(429)  # stream_limit: the tenant's streams at GENX_MAX_STREAMS_PER_TENANT
    for code in sorted(codes):
        content = {"application/json": {"schema": ERROR}}
        entry: dict[str, Any] = {"description": STATUS_TEXT[code], "content": content}
        if code == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        if code == 405:
            entry["headers"] = {"Allow": {"schema": {"type": "string"}}}
        responses.setdefault(str(code), entry)
    if open_route:
        op["security"] = []
    else:
        op["security"] = [{"bearer": []}] if keys_on else [{"bearer": []}, {}]
