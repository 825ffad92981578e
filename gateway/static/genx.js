// genx.js: start genx-ray runs and follow their events from a browser, resuming exactly.
//
//   import { startRun, followRun } from "https://your-gateway/ui/genx.js";
//
// followRun() reads GET /v1/runs/{id}/events with EventSource. A dropped connection is resumed
// after the last event id seen (the browser sends Last-Event-ID itself; when it gives up, for
// instance while a gateway restarts, followRun reopens the stream with ?after=<last id>), and an
// event whose id is not past the last one is dropped: onEvent sees every event once, in order,
// however often the connection drops. Keep `lastId` (from onEvent or the handle) to resume a
// follow in another page with `after`.
//
// A browser authenticates with a run token, never an API key: the run's `stream_token` (in the
// response that created it) or one from POST /v1/runs/{id}/tokens. Start runs from your backend
// with an API key and hand the browser the run id and token; startRun() here is for gateways
// without API keys, and for tools that hold a key anyway.

/** Every event type a run has (EventSource delivers only the named types it listens for). */
export const EVENT_TYPES = [
  "run.queued", "run.scheduled", "run.started", "run.restarted", "run.waiting", "run.resumed",
  "step.started", "step.retrying", "step.completed", "step.failed",
  "progress", "output", "input.requested", "input.received", "child.started", "child.finished",
  "run.succeeded", "run.failed", "run.cancelled", "events.truncated",
];
/** The run's last event: the stream ends after one of these. */
export const TERMINAL_TYPES = ["run.succeeded", "run.failed", "run.cancelled"];

/** An error the API answered: `status` (HTTP), `code` (e.g. "token_expired"), `message`. */
export class GenxError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.name = "GenxError";
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

function apiUrl(baseUrl, path, params = {}) {
  const base = (baseUrl ?? "").replace(/\/+$/, "");
  const url = new URL(base + path, globalThis.location?.href);
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null) continue;
    for (const one of Array.isArray(value) ? value : [value]) url.searchParams.append(name, String(one));
  }
  return url.toString();
}

/**
 * Any call of the API: `path` under `baseUrl`, `params` as the query, `body` as JSON; resolves to
 * the answer's JSON, or rejects with a GenxError. `apiKey` goes in the Authorization header
 * (never in a URL); `token` (a run token) as ?token=.
 */
export function request(method, path, { baseUrl, apiKey, token, params, body, headers } = {}) {
  return call(method, apiUrl(baseUrl, path, { ...params, token }), { apiKey, body, headers });
}

async function call(method, url, { apiKey, body, headers: extra } = {}) {
  const headers = { Accept: "application/json", ...extra };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const error = data?.error ?? { code: "http_error", message: resp.statusText };
    throw new GenxError(resp.status, error.code, error.message);
  }
  return data;
}

/** Start a run of `workflow`; resolves to the run, with its `stream_token`. */
export function startRun(workflow, input, { baseUrl, apiKey, idempotencyKey } = {}) {
  const url = apiUrl(baseUrl, `/v1/workflows/${encodeURIComponent(workflow)}/runs`);
  const headers = idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {};
  return call("POST", url, { apiKey, body: { input }, headers });
}

/** The run object (status, output, error, timings, usage). */
export function getRun(runId, { baseUrl, token, apiKey } = {}) {
  return call("GET", apiUrl(baseUrl, `/v1/runs/${encodeURIComponent(runId)}`, { token }), { apiKey });
}

/** The run's steps, in the order its code called them (a map as one entry). */
export async function getSteps(runId, { baseUrl, token, apiKey } = {}) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/steps`;
  return (await request("GET", path, { baseUrl, token, apiKey })).steps;
}

/**
 * A fresh run token ({token, expires_at, scope}); needs an API key when the gateway has keys.
 * `scope`: "read" (the default) or "answer" (it may also answer the run's input requests).
 */
export function mintToken(runId, { baseUrl, apiKey, ttl, scope } = {}) {
  const url = apiUrl(baseUrl, `/v1/runs/${encodeURIComponent(runId)}/tokens`);
  const body = {};
  if (ttl) body.ttl = ttl;
  if (scope) body.scope = scope;
  return call("POST", url, { apiKey, body });
}

/**
 * Answer a run waiting in wait_for_input: `input` must fit the schema of its input.requested
 * event (422 names the field), `inputId` (optional) the event's input_id. Needs an API key, or a
 * run token minted with scope "answer" (a run's stream_token only reads).
 */
export function sendInput(runId, input, { baseUrl, token, apiKey, inputId } = {}) {
  const url = apiUrl(baseUrl, `/v1/runs/${encodeURIComponent(runId)}/input`, { token });
  const body = inputId ? { input, input_id: inputId } : { input };
  return call("POST", url, { apiKey, body });
}

/** Whether stream id `a` comes after `b` (ids are "<ms>-<seq>"). */
export function isAfter(a, b) {
  if (b === null || b === undefined) return true;
  const [am, as = "0"] = String(a).split("-");
  const [bm, bs = "0"] = String(b).split("-");
  return Number(am) !== Number(bm) ? Number(am) > Number(bm) : Number(as) > Number(bs);
}

/**
 * Follow a run's events until its terminal event.
 *   onEvent(event, id)   every event once, in order (event: the parsed event JSON)
 *   onEnd(event)         after the terminal event's onEvent; the stream is closed
 *   onError(error)       the API refused (a GenxError: token_expired, run_not_found...); stopped
 *   onState(state)       "live" | "reconnecting" | "ended" | "error"
 * `after`: resume after this event id (nothing before it is delivered).
 * Returns { close(), lastId }.
 */
export function followRun(runId, { baseUrl, token, after, onEvent, onEnd, onError, onState } = {}) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/events`;
  let lastId = after ?? null;
  let source = null;
  let timer = null;
  let stopped = false;
  let failures = 0;

  const stop = (state) => {
    stopped = true;
    clearTimeout(timer);
    source?.close();
    onState?.(state);
  };

  const deliver = (message) => {
    if (stopped || !isAfter(message.lastEventId, lastId)) return; // seen already
    lastId = message.lastEventId;
    failures = 0;
    const event = JSON.parse(message.data);
    onEvent?.(event, lastId);
    if (TERMINAL_TYPES.includes(event.type)) {
      stop("ended"); // before the server closes: a closed EventSource does not reconnect
      onEnd?.(event);
    }
  };

  // The browser gave up on the stream (an HTTP error, or a reconnect that failed): ask the API
  // why. A refusal (4xx) ends the follow; anything else is a gateway away for now: try again.
  const recover = async () => {
    try {
      await getRun(runId, { baseUrl, token });
    } catch (error) {
      if (error instanceof GenxError && error.status >= 400 && error.status < 500) {
        stop("error");
        onError?.(error);
        return;
      }
    }
    if (!stopped) timer = setTimeout(open, Math.min(10000, 500 * 2 ** failures++));
  };

  const open = () => {
    if (stopped) return;
    source = new EventSource(apiUrl(baseUrl, path, { token, after: lastId }));
    source.onopen = () => onState?.("live");
    for (const type of EVENT_TYPES) source.addEventListener(type, deliver);
    source.onerror = () => {
      if (stopped) return;
      onState?.("reconnecting");
      if (source.readyState === EventSource.CLOSED) recover();
      // CONNECTING: the browser reconnects by itself, with Last-Event-ID
    };
  };

  open();
  return {
    close: () => stop("ended"),
    get lastId() {
      return lastId;
    },
  };
}
