// A run's view, shared by the run viewer (GET /ui/runs/{id}?token=...) and the console's run page
// (/ui/#/runs/{id}): its status, facts, progress, timeline, output, result, the form of the input
// it waits for, and its step waterfall, live, rebuilt from the run's event stream on every mount.
//
// mountRun(container, {runId, base, token, apiKey, actions}) builds the view inside `container`
// and follows the run until close(). Credentials: a run token (the viewer's, from its URL), or
// an API key (the console's: sent as a bearer header, never in a URL; the event stream, which
// EventSource opens without headers, reads with a run token minted for this run). What must stay
// true:
// - Run data only ever goes into the page as text (textContent, text nodes): never as HTML. The
//   view's skeleton is built with createElement, from constants.
// - #status holds the status word; a terminal word only once the terminal event has been
//   applied, so #output (every output chunk, in stream order, as text) is complete by then.
//   A credential the API refuses makes #status "error", with the API's error code shown.
// - One view is mounted at a time (element ids are the page's); close() stops everything it
//   started, and nothing it started writes to the page after.

import { followRun, getRun, getSteps, GenxError, mintToken, sendInput } from "./genx.js";

const TIMELINE_MAX = 300; // entries kept on the page; older ones are counted, not shown
const POLL_MS = 2000; // how often the run object (usage, timings) is refreshed while it runs
const TERMINAL_STATUS = { "run.succeeded": "succeeded", "run.failed": "failed", "run.cancelled": "cancelled" };
const HINTS = {
  token_invalid: "The link's token is not valid here: it was altered, or signed with another secret.",
  token_expired: "The link's token has expired. Mint a new one: POST /v1/runs/{id}/tokens.",
  token_wrong_run: "The link's token belongs to another run.",
  token_not_allowed: "A run token only reads its own run.",
  unauthorized: "This gateway needs a credential: open the viewer with ?token=<the run's stream_token>.",
  run_not_found: "There is no such run here (or it has passed its retention period).",
  network_error: "The gateway could not be reached.",
};

const $ = (id) => document.getElementById(id);

function node(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = String(text);
  return el;
}

function seconds(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "-";
  if (value < 60) return `${value.toFixed(value < 10 ? 1 : 0)} s`;
  const m = Math.floor(value / 60);
  return m < 60 ? `${m} min ${Math.round(value % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function clock(ts) {
  if (!ts) return "-";
  const date = new Date(ts * 1000);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

const epoch = (iso) => (iso ? Date.parse(iso) / 1000 : null);
const text = (data) => (typeof data === "string" ? data : JSON.stringify(data));
const brief = (data) => (data === null || data === undefined ? "" : JSON.stringify(data));

function setStatus(word) {
  const status = $("status");
  status.textContent = word;
  status.className = `status s-${word}`;
  const cancel = $("cancel"); // the console's: nothing to cancel once the run ended
  if (cancel) cancel.disabled = ["succeeded", "failed", "cancelled", "error"].includes(word);
  document.title = `${word} · ${$("workflow").textContent} · genx-ray`;
}

function showProblem(code, message) {
  setStatus("error");
  $("problem").hidden = false;
  $("problem-code").textContent = code;
  $("problem-message").textContent = message;
  $("problem-hint").textContent = HINTS[code] ?? "";
  $("connection").textContent = "";
}

function renderFacts() {
  $("attempt").textContent = String(view.attempt);
  $("created").textContent = clock(view.created);
  $("started").textContent = clock(view.started);
  $("finished").textContent = clock(view.finished);
  const from = view.started ?? view.created;
  const to = view.finished ?? (view.ended ? null : Date.now() / 1000);
  $("elapsed").textContent = from && to ? seconds(Math.max(0, to - from)) : "-";
  const s = view.steps;
  const extra = [s.retried ? `${s.retried} retried` : "", s.failed ? `${s.failed} failed` : ""];
  // Steps by id: a replayed or reused step completes without a start event of its own.
  $("steps-done").textContent = [`${s.completed.size}/${s.seen.size} done`, ...extra].filter(Boolean).join(" · ");
}

function renderUsage(usage) {
  if (!usage) return;
  const n = (v) => Number(v ?? 0).toLocaleString();
  const retries = usage.retries ? ` (${n(usage.retries)} retried)` : "";
  $("llm-calls").textContent = `${n(usage.calls)}${retries}`;
  $("llm-tokens").textContent = `${n(usage.prompt_tokens)} in · ${n(usage.completion_tokens)} out`;
  $("llm-cost").textContent = `$${Number(usage.cost_usd ?? 0).toFixed(4)}`;
}

// The run object: names, timings, usage. Its status is shown only while the stream has not
// spoken since it was asked for: the stream is the fresher source, and the only one for the end.
function showRun(run, eventsBefore) {
  $("workflow").textContent = run.workflow;
  $("run-id").textContent = run.id;
  view.attempt = Math.max(view.attempt, run.attempt ?? 1);
  view.created = epoch(run.created_at) ?? view.created;
  view.started = epoch(run.started_at) ?? view.started;
  view.finished = epoch(run.finished_at) ?? view.finished;
  const terminal = ["succeeded", "failed", "cancelled"].includes(run.status);
  if (!view.ended && !terminal && eventsBefore === view.eventsSeen) setStatus(run.status);
  renderUsage(run.usage);
  renderFacts();
  showLinks(run);
}

function showResult(status, output, error, reason) {
  $("result-card").hidden = false;
  if (status === "succeeded") {
    $("result-title").textContent = "Result";
    $("result").textContent = JSON.stringify(output ?? null, null, 2);
  } else if (status === "failed") {
    $("result-title").textContent = "Error";
    const trace = error?.traceback ? `\n\n${error.traceback}` : "";
    $("result").textContent = `${error?.type ?? "Error"}: ${error?.message ?? ""}${trace}`;
  } else {
    $("result-title").textContent = "Cancelled";
    $("result").textContent = reason ?? "cancelled";
  }
  $("result-card").classList.toggle("failed", status !== "succeeded");
}

function addTimeline(event, label, detail, tone = "") {
  const list = $("timeline");
  const item = node("li", tone);
  const at = view.firstTs === null ? 0 : event.ts - view.firstTs;
  item.append(node("span", "at", `+${seconds(at)}`), node("span", "what", label));
  if (detail) item.append(node("span", "detail", detail));
  list.append(item);
  if (list.children.length > TIMELINE_MAX) {
    list.firstElementChild.remove();
    view.hiddenEntries += 1;
    $("timeline-hidden").hidden = false;
    $("timeline-hidden").textContent = `${view.hiddenEntries} earlier entries not shown`;
  }
  scrollToEnd(list);
}

function addProblem(event, what) {
  $("problems-card").hidden = false;
  const item = node("li", event.type === "step.failed" ? "bad" : "warn");
  const step = event.step ?? {};
  item.append(
    node("span", "what", `${what} ${step.name ?? ""}`),
    node("code", "step-id", `${step.id ?? ""} #${step.attempt ?? 1}`),
    node("span", "detail", `${event.error?.type ?? "Error"}: ${event.error?.message ?? ""}`),
  );
  if (event.type === "step.retrying") item.append(node("span", "at", `retry in ${seconds(event.delay)}`));
  $("problems").append(item);
}

function showMap(event) {
  const d = event.data ?? {};
  const key = String(d.step ?? event.step?.id ?? "map");
  let bar = view.maps.get(key);
  if (!bar) {
    const row = node("div", "map");
    const label = node("div", "map-label");
    label.append(node("span", "what", event.step?.name ?? "map"), node("code", "step-id", key));
    bar = { progress: node("progress"), numbers: node("div", "map-numbers") };
    row.append(label, bar.progress, bar.numbers);
    $("maps").append(row);
    $("maps-card").hidden = false;
    view.maps.set(key, bar);
  }
  bar.progress.max = Math.max(1, d.total ?? 0);
  bar.progress.value = d.done ?? 0;
  const parts = [`${d.done ?? 0}/${d.total ?? 0}`];
  if (d.failed) parts.push(`${d.failed} failed`);
  if (d.rate !== undefined) parts.push(`${Number(d.rate).toFixed(1)}/s`);
  if (d.eta !== null && d.eta !== undefined && d.done < d.total) parts.push(`ETA ${seconds(d.eta)}`);
  if (d.batch) {  // map(llm="batch"): the round's provider batches
    const counts = d.batch.request_counts ?? {};
    parts.push(`batch round ${d.batch.round} ${d.batch.status}` +
      (counts.total ? ` ${counts.completed ?? 0}/${counts.total}` : "") +
      ` (${(d.batch.ids ?? []).join(", ")})`);
  }
  bar.numbers.textContent = parts.join(" · ");
  bar.numbers.classList.toggle("bad", Boolean(d.failed));
}

function showOutput(event) {
  const chunk = text(event.data);
  view.output.appendData(chunk);
  $("output-empty").hidden = true;
  scrollToEnd($("output"));
  const key = event.step?.id ?? "(workflow)";
  let pane = view.byStep.get(key);
  if (!pane) {
    const section = node("section", "step-output");
    const title = node("h3");
    title.append(node("span", "what", event.step?.name ?? "workflow"), node("code", "step-id", key));
    const pre = node("pre", "output");
    pane = { text: pre.appendChild(document.createTextNode("")), pre };
    section.append(title, pre);
    $("by-step").append(section);
    view.byStep.set(key, pane);
    $("by-step-card").hidden = view.byStep.size < 2; // one source: #output says it all
  }
  pane.text.appendData(chunk);
}

// A box the reader left at its end stays there as text arrives; one scrolled up stays put.
// Layout is read once a frame at most, not once an event (a replay brings thousands at once).
function scrollToEnd(box) {
  view.toScroll.add(box);
  if (view.scrollQueued) return;
  view.scrollQueued = true;
  requestAnimationFrame(() => {
    view.scrollQueued = false;
    for (const el of view.toScroll) if (el.dataset.pinned !== "no") el.scrollTop = el.scrollHeight;
    view.toScroll.clear();
  });
}

function apply(event) {
  view.eventsSeen += 1;
  if (view.firstTs === null) view.firstTs = event.ts;
  switch (event.type) {
    case "run.queued":
      setStatus("queued");
      addTimeline(event, "queued", `attempt ${event.attempt ?? 1}`);
      break;
    case "run.started":
      view.attempt = event.attempt ?? view.attempt;
      view.started = event.ts;
      setStatus("running");
      addTimeline(event, "started", `attempt ${view.attempt}${event.worker ? ` on ${event.worker}` : ""}`);
      break;
    case "run.restarted":
      view.attempt = event.attempt;
      setStatus("queued");
      addTimeline(event, "restarted", `attempt ${event.attempt}: ${event.reason}`, "warn");
      break;
    case "step.started":
      view.steps.seen.add(event.step.id);
      loadStepsSoon();
      break;
    case "step.completed":
      view.steps.seen.add(event.step.id);
      view.steps.completed.add(event.step.id);
      loadStepsSoon();
      break;
    case "step.retrying":
      view.steps.retried += 1;
      addProblem(event, "retrying");
      break;
    case "step.failed":
      view.steps.seen.add(event.step.id);
      view.steps.failed += 1;
      addProblem(event, "failed");
      loadStepsSoon();
      break;
    case "progress":
      if (event.kind === "map") showMap(event);
      else if (event.kind === "llm.usage") refreshSoon();
      else addTimeline(event, event.kind, brief(event.data), event.kind.startsWith("llm.") ? "warn" : "");
      break;
    case "output":
      showOutput(event);
      break;
    case "run.scheduled":
      setStatus("scheduled");
      addTimeline(event, "scheduled", `starts ${clock(event.start_at)}`);
      break;
    case "run.waiting":
      setStatus("waiting");
      addTimeline(event, "waiting", `for ${event.reason}${event.until ? ` until ${clock(event.until)}` : ""}`);
      break;
    case "run.resumed":
      askForInput(null); // answered, or past its deadline
      view.attempt = event.attempt ?? view.attempt;
      setStatus("queued");
      addTimeline(event, "resumed", event.reason ?? "");
      break;
    case "input.requested":
      addTimeline(event, "input requested", event.prompt ?? brief(event.input_schema));
      askForInput(event);
      break;
    case "input.received":
      addTimeline(event, "input received", brief(event.input));
      if (view.asking?.input_id === event.input_id) askForInput(null);
      break;
    case "child.started":
      addTimeline(event, "child started", `${event.workflow} ${event.child_id}`);
      break;
    case "child.finished":
      addTimeline(event, "child finished", `${event.child_id}: ${event.status}`);
      break;
    case "events.truncated":
      addTimeline(event, "earlier events trimmed", `${event.trimmed} events before ${event.first_available} are gone`, "warn");
      break;
    default:
      if (event.type in TERMINAL_STATUS) {
        const status = TERMINAL_STATUS[event.type];
        askForInput(null);
        view.ended = true;
        view.finished = event.ts;
        setStatus(status);
        $("output-empty").textContent = "No output.";
        const detail = status === "failed" ? `${event.error?.type}: ${event.error?.message}` : (event.reason ?? "");
        addTimeline(event, status, detail, status === "succeeded" ? "good" : "bad");
        showResult(status, event.output, event.error, event.reason);
      } else {
        addTimeline(event, event.type, "");
      }
  }
  renderFacts();
}

// -- the form for a run's wait_for_input --------------------------------------------------------
//
// Generated from the JSON schema of the input.requested event (a pydantic model's): a checkbox
// for a boolean, a number box, a select for an enum, a text box, a textarea (one item a line) for
// a list, JSON for anything else. The API checks the input again: its 422 names the field.

function fieldSchema(schema, defs) {
  let s = schema ?? {};
  let nullable = false;
  if (Array.isArray(s.anyOf)) {
    nullable = s.anyOf.some((o) => o.type === "null");
    s = { ...s, ...(s.anyOf.find((o) => o.type !== "null") ?? {}) };
  }
  if (s.$ref) s = { ...s, ...(defs[s.$ref.split("/").pop()] ?? {}) };
  return { s, nullable };
}

function buildField(name, schema, required, defs) {
  const { s, nullable } = fieldSchema(schema, defs);
  const id = `input-${name}`;
  const wrap = node("div", "input-field");
  const label = node("label", "", s.title ?? name);
  label.htmlFor = id;
  if (required) label.append(node("span", "hint", " (required)"));
  const dflt = s.default ?? schema?.default;
  let control;
  let read;
  if (s.type === "boolean") {
    wrap.classList.add("check");
    control = node("input");
    control.type = "checkbox";
    control.checked = Boolean(dflt);
    read = () => control.checked;
  } else if (s.type === "integer" || s.type === "number") {
    control = node("input");
    control.type = "number";
    control.step = s.type === "integer" ? "1" : "any";
    if (dflt !== undefined && dflt !== null) control.value = String(dflt);
    read = () => (control.value === "" ? (nullable ? null : undefined) : Number(control.value));
  } else if (Array.isArray(s.enum)) {
    control = node("select");
    for (const option of s.enum) control.append(node("option", "", option));
    if (dflt !== undefined && dflt !== null) control.value = String(dflt);
    read = () => s.enum.find((option) => String(option) === control.value);
  } else if (s.type === "string") {
    control = node("input");
    control.type = "text";
    if (dflt !== undefined && dflt !== null) control.value = String(dflt);
    read = () => (control.value === "" && nullable ? null : control.value);
  } else if (s.type === "array" && ["string", "integer", "number"].includes(s.items?.type)) {
    control = node("textarea");
    control.placeholder = "one a line";
    if (Array.isArray(dflt)) control.value = dflt.join("\n");
    const item = s.items.type === "string" ? (v) => v : Number;
    read = () => {
      const lines = control.value.split("\n").map((l) => l.trim()).filter(Boolean);
      return lines.length ? lines.map(item) : nullable ? null : [];
    };
  } else {
    control = node("textarea");
    control.placeholder = "JSON";
    if (dflt !== undefined) control.value = JSON.stringify(dflt, null, 2);
    read = () => {
      if (control.value.trim() === "") return nullable ? null : undefined;
      try {
        return JSON.parse(control.value);
      } catch {
        throw new Error(`${name}: not valid JSON`);
      }
    };
  }
  control.id = id;
  control.name = name;
  if (s.type === "boolean") wrap.append(control, label);
  else wrap.append(label, control);
  if (s.description) wrap.append(node("span", "hint", s.description));
  return { name, read, el: wrap };
}

function askForInput(event) {
  view.asking = event;
  $("input-card").hidden = !event || view.ended;
  if (!event) return;
  const schema = event.input_schema ?? {};
  const defs = schema.$defs ?? {};
  const required = new Set(schema.required ?? []);
  $("input-prompt").textContent = event.prompt ?? "";
  $("input-deadline").textContent = event.deadline ? `Answer by ${clock(event.deadline)}.` : "";
  $("input-error").textContent = "";
  $("input-send").disabled = false;
  $("input-send").textContent = "Send";
  const fields = $("input-fields");
  fields.replaceChildren();
  view.inputFields = Object.entries(schema.properties ?? {}).map(([name, sub]) =>
    buildField(name, sub, required.has(name), defs));
  fields.append(...view.inputFields.map((field) => field.el));
}

async function submitInput(submit) {
  submit.preventDefault();
  const asking = view.asking;
  if (!asking) return;
  const value = {};
  try {
    for (const field of view.inputFields) {
      const v = field.read();
      if (v !== undefined) value[field.name] = v;
    }
  } catch (error) {
    $("input-error").textContent = error.message;
    return;
  }
  $("input-send").disabled = true;
  $("input-error").textContent = "";
  const options = { baseUrl: ctx.base, token: ctx.token, apiKey: ctx.apiKey, inputId: asking.input_id };
  try {
    try {
      await sendInput(ctx.runId, value, options);
    } catch (error) {
      // A read-only link: a gateway without API keys takes the answer without any credential.
      if (!(error instanceof GenxError && error.code === "token_not_allowed")) throw error;
      await sendInput(ctx.runId, value, { ...options, token: undefined });
    }
    $("input-send").textContent = "Sent";
  } catch (error) {
    $("input-send").disabled = false;
    const hint = error.code === "unauthorized" || error.code === "token_not_allowed"
      ? " (this link only reads the run: answering needs a link minted with scope answer)"
      : "";
    $("input-error").textContent = `${error.detail ?? error.message}${hint}`;
  }
}


let refreshTimer = null;
async function refresh() {
  clearTimeout(refreshTimer);
  const gen = ctx.gen;
  const before = view.eventsSeen;
  try {
    const run = await getRun(ctx.runId, creds());
    if (!alive(gen)) return;
    if (!view.ended) showRun(run, before);
  } catch {
    // the stream's own recovery reports what matters; a missed refresh is only late numbers
  }
  if (!view.ended && alive(gen)) refreshTimer = setTimeout(refresh, POLL_MS);
}

function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 300);
}

async function finish() {
  clearTimeout(refreshTimer);
  const gen = ctx.gen;
  for (let attempt = 0; attempt < 5; attempt += 1) {
    try {
      const run = await getRun(ctx.runId, creds());
      if (!alive(gen)) return;
      showRun(run, -1);
      if (run.status === "succeeded" || run.status === "failed" || run.status === "cancelled") {
        showResult(run.status, run.output, run.error, null);
      }
      break;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  if (!alive(gen)) return;
  loadSteps();
  document.body.dataset.final = "true";
}


// -- the step waterfall ---------------------------------------------------------------------------
//
// One row per step ([data-step-id]) in the order the run's code called them, under the step that
// called it: a bar from its start to its end on the run's time axis, its attempts, cached or
// reused (from the run it reruns), its error; a map with its items counted and its first failed
// items. With `actions`, a button to rerun the run from that step.

const STEPS_EVERY_MS = 1000;

function loadStepsSoon() {
  if (view.stepsTimer) return;
  view.stepsTimer = setTimeout(() => {
    view.stepsTimer = null;
    loadSteps();
  }, STEPS_EVERY_MS);
}

async function loadSteps() {
  const gen = ctx.gen;
  let steps;
  try {
    steps = await getSteps(ctx.runId, creds());
  } catch {
    return; // the stream reports what matters; the waterfall is only late
  }
  if (alive(gen)) renderSteps(steps);
}

const at = (iso) => (iso ? Date.parse(iso) / 1000 : null);

function renderSteps(steps) {
  const list = $("steps");
  list.replaceChildren();
  $("steps-empty").hidden = steps.length > 0;
  const starts = steps.map((s) => at(s.started_at)).filter((v) => v !== null);
  const ends = steps.map((s) => at(s.finished_at) ?? at(s.started_at)).filter((v) => v !== null);
  const origin = Math.min(view.created ?? Infinity, ...starts);
  const end = Math.max(view.finished ?? 0, ...ends, view.ended ? 0 : Date.now() / 1000);
  const span = Math.max(end - origin, 0.001);
  const depth = new Map();
  for (const s of steps) depth.set(s.id, s.parent && depth.has(s.parent) ? depth.get(s.parent) + 1 : 0);
  for (const s of steps) {
    const row = node("li", `step s-${s.status}`);
    row.dataset.stepId = s.id;
    row.style.setProperty("--depth", String(depth.get(s.id)));
    const label = node("div", "step-label");
    label.append(node("span", "what", s.component), node("code", "step-id", s.id));
    const lane = node("div", "step-lane");
    const bar = node("div", "step-bar");
    const from = at(s.started_at);
    if (from !== null) {
      const to = at(s.finished_at) ?? (view.ended ? from : Date.now() / 1000);
      bar.style.left = `${(100 * (from - origin)) / span}%`;
      bar.style.width = `${Math.max(0.4, (100 * (to - from)) / span)}%`;
      bar.title = `${seconds(Math.max(0, to - from))}`;
    } else {
      bar.hidden = true;
    }
    lane.append(bar);
    const facts = node("div", "step-facts");
    facts.append(node("span", `step-status`, s.status));
    if (s.kind === "map") {
      const failed = s.failed ? `, ${s.failed} failed` : "";
      facts.append(node("span", "step-items", `${s.done ?? 0}/${s.items ?? 0} items${failed}`));
    } else if (s.attempts) {
      facts.append(node("span", "step-attempts", `${s.attempts} attempt${s.attempts === 1 ? "" : "s"}`));
    }
    if (s.cached) facts.append(node("span", "flag cached", "cached"));
    if (s.reused) facts.append(node("span", "flag reused", "reused"));
    if (ctx.actions && view.ended) {
      const button = node("button", "rerun-from", "rerun from here");
      button.type = "button";
      button.addEventListener("click", () => ctx.actions.rerun(s.id));
      facts.append(button);
    }
    row.append(label, lane, facts);
    if (s.error) row.append(node("div", "step-error", `${s.error.type}: ${s.error.message}`));
    for (const item of (s.failed_items ?? []).slice(0, 5)) {
      row.append(node("div", "step-error", `item ${item.index}: ${item.error.type}: ${item.error.message}`));
    }
    if ((s.failed_items ?? []).length > 5) {
      row.append(node("div", "hint", `${s.failed - 5} more failed items`));
    }
    list.append(row);
  }
}

// -- the view's skeleton ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "className") el.className = value;
    else if (name === "hidden") el.hidden = Boolean(value);
    else el.setAttribute(name, value);
  }
  for (const child of children) el.append(typeof child === "string" ? document.createTextNode(child) : child);
  return el;
}

const card = (id, title, ...children) => h("section", { id, className: "card", hidden: true }, h("h2", {}, title), ...children);
const fact = (id, title) => h("div", {}, h("dt", {}, title), h("dd", { id }, "-"));

function skeleton(withActions) {
  const head = h("div", { className: "run-head" },
    h("h1", { id: "workflow" }, "run"),
    h("code", { id: "run-id", className: "run-id" }),
    h("span", { id: "status", className: "status" }, "loading"),
    h("span", { id: "connection", className: "connection" }));
  if (withActions) {
    head.append(h("span", { className: "run-actions" },
      h("button", { id: "cancel", type: "button" }, "Cancel"),
      h("button", { id: "rerun", type: "button" }, "Rerun")));
  }
  const problem = h("section", { id: "problem", className: "card problem", hidden: true },
    h("h2", {}, "This run cannot be shown"),
    h("p", {}, h("code", { id: "problem-code" }), " ", h("span", { id: "problem-message" })),
    h("p", { id: "problem-hint", className: "hint" }));
  const links = h("p", { id: "run-links", className: "hint run-links" },
    h("span", {}, "Trace id "), h("code", { id: "trace-id" }, "-"),
    h("span", { id: "rerun-of" }), h("span", { id: "reruns" }));
  const facts = h("section", { className: "card facts" }, h("dl", {},
    fact("attempt", "Attempt"), fact("created", "Created"), fact("started", "Started"),
    fact("finished", "Finished"), fact("elapsed", "Elapsed"), fact("steps-done", "Steps"),
    fact("llm-calls", "LLM calls"), fact("llm-tokens", "LLM tokens"), fact("llm-cost", "Cost (est.)")));
  const input = h("section", { id: "input-card", className: "card input-card", hidden: true },
    h("h2", {}, "The run waits for your input"),
    h("p", { id: "input-prompt", className: "prompt" }),
    h("p", { id: "input-deadline", className: "hint" }),
    h("form", { id: "input-form", className: "input-form", novalidate: "" },
      h("div", { id: "input-fields", className: "input-fields" }),
      h("div", { className: "input-actions" },
        h("button", { id: "input-send", type: "submit" }, "Send"),
        h("span", { id: "input-error", className: "input-error", role: "alert" }))));
  const waterfall = h("section", { id: "steps-card", className: "card" }, h("h2", {}, "Steps"),
    h("p", { id: "steps-empty", className: "hint" }, "No step has run yet."),
    h("ol", { id: "steps", className: "waterfall" }));
  const columns = h("div", { className: "columns" },
    h("section", { className: "card output-card" }, h("h2", {}, "Output"),
      h("p", { id: "output-empty", className: "hint" }, "Nothing streamed yet."),
      h("pre", { id: "output", className: "output" })),
    h("section", { className: "card timeline-card" }, h("h2", {}, "Timeline"),
      h("p", { id: "timeline-hidden", className: "hint", hidden: true }),
      h("ol", { id: "timeline", className: "timeline" })));
  const content = h("div", { id: "content", hidden: true }, links, facts, input,
    card("maps-card", "Progress", h("div", { id: "maps", className: "maps" })),
    waterfall, columns,
    card("problems-card", "Retries and failures", h("ol", { id: "problems", className: "problems" })),
    card("by-step-card", "Output by step", h("div", { id: "by-step", className: "by-step" })),
    h("section", { id: "result-card", className: "card", hidden: true },
      h("h2", { id: "result-title" }, "Result"), h("pre", { id: "result", className: "result" })));
  return [head, problem, content];
}

// -- mounting -------------------------------------------------------------------------------------

let ctx = { gen: 0 };
let view = null;
let generation = 0;

const alive = (gen) => gen === ctx.gen;
const creds = () => ({ baseUrl: ctx.base, token: ctx.token, apiKey: ctx.apiKey });

function freshView() {
  return {
    ended: false, attempt: 1, created: null, started: null, finished: null, firstTs: null,
    eventsSeen: 0, steps: { seen: new Set(), completed: new Set(), failed: 0, retried: 0 },
    maps: new Map(), byStep: new Map(), hiddenEntries: 0,
    output: $("output").appendChild(document.createTextNode("")),
    toScroll: new Set(), scrollQueued: false, stepsTimer: null, asking: null,
  };
}

function showLinks(run) {
  $("trace-id").textContent = run.trace_id ?? "none (tracing is off)";
  $("rerun-of").textContent = run.rerun_of
    ? ` · a rerun of ${run.rerun_of}${run.rerun_from_step ? ` from ${run.rerun_from_step}` : ""}`
    : "";
  $("reruns").textContent = run.reruns?.length ? ` · rerun as ${run.reruns.join(", ")}` : "";
}

/**
 * Show run `runId` in `container`, live, until close(). `token`: a run token (the viewer);
 * `apiKey`: an API key (the console; null on a gateway without keys). `actions` (the console):
 * {cancel(), rerun(fromStep)} behind the view's buttons. `header`: where the run's name, id,
 * status and connection go, if not at the top of `container` (the viewer's bar).
 */
export function mountRun(container, { runId, base, token = null, apiKey = null, actions = null, header = null }) {
  generation += 1;
  ctx = { gen: generation, runId, base, token, apiKey, actions, follow: null, ticker: null };
  const gen = ctx.gen;
  const [head, ...rest] = skeleton(Boolean(actions));
  if (header) {
    header.append(...head.childNodes); // the viewer: the run's name and status in the page's bar
    container.replaceChildren(...rest);
  } else {
    container.replaceChildren(head, ...rest);
  }
  view = freshView();
  $("input-form").addEventListener("submit", submitInput);
  for (const box of [$("output"), $("timeline")]) {
    box.addEventListener("scroll", () => {
      box.dataset.pinned = box.scrollHeight - box.scrollTop - box.clientHeight < 40 ? "yes" : "no";
    });
  }
  if (actions) {
    $("cancel").addEventListener("click", () => actions.cancel());
    $("rerun").addEventListener("click", () => actions.rerun(null));
  }
  start(gen);
  return {
    close() {
      if (!alive(gen)) return;
      ctx.follow?.close();
      clearInterval(ctx.ticker);
      clearTimeout(refreshTimer);
      clearTimeout(view.stepsTimer);
      ctx = { gen: -1 };
    },
  };
}

async function start(gen) {
  ctx.ticker = setInterval(() => view.ended || renderFacts(), 1000);
  let run;
  let streamToken = ctx.token;
  try {
    if (!ctx.runId) throw new GenxError(404, "not_found", "not a run address");
    run = await getRun(ctx.runId, creds());
    if (!streamToken) streamToken = (await mintToken(ctx.runId, { baseUrl: ctx.base, apiKey: ctx.apiKey })).token;
  } catch (error) {
    if (!alive(gen)) return;
    if (error instanceof GenxError) showProblem(error.code, error.detail);
    else showProblem("network_error", String(error));
    return;
  }
  if (!alive(gen)) return;
  $("content").hidden = false;
  showRun(run, 0); // a finished run's status word comes with its terminal event, after replay
  showLinks(run);
  loadSteps();
  ctx.follow = followRun(ctx.runId, {
    baseUrl: ctx.base,
    token: streamToken,
    onEvent: (event) => alive(gen) && apply(event),
    onEnd: () => alive(gen) && finish(),
    onError: (error) => alive(gen) && showProblem(error.code, error.detail),
    onState: (state) => {
      if (!alive(gen)) return;
      $("connection").textContent = { live: "● live", reconnecting: "reconnecting…" }[state] ?? "";
      $("connection").className = `connection ${state}`;
    },
  });
  refreshTimer = setTimeout(refresh, POLL_MS);
}
