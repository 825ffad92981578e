// The operators' console (/ui/): runs (filter, page, count by status, cancel and rerun in bulk), a
// run (the viewer's view, its step waterfall, cancel, rerun, rerun from a step, answer its
// input), schedules (create, pause, resume, delete) and the cluster (workers, run hosts, queue,
// LLM budgets), each page a call of the HTTP API.
//
// What must stay true:
// - The API key is kept in sessionStorage (this tab) and sent as an Authorization header only:
//   never in an address (the pages' addresses are #fragments without it) nor in a cookie. A
//   gateway without API keys opens the console without one.
// - Data is only ever text on the page (textContent): tags, names, outputs and errors come from
//   users and workflows.
// - Acting on runs says how many it acts on and asks first; bulk actions carry an
//   Idempotency-Key, so a retried click does nothing twice.

import { GenxError, request } from "./genx.js";
import { mountRun } from "./run-view.js";

const KEY = "genx.apiKey";
const PAGE_SIZE = 50;
const REFRESH_MS = 3000;
const STATUSES = ["queued", "scheduled", "running", "waiting", "succeeded", "failed", "cancelled"];
const TERMINAL = ["succeeded", "failed", "cancelled"];

const $ = (id) => document.getElementById(id);
const base = location.origin + location.pathname.replace(/\/ui\/?$/, "");
let apiKey = sessionStorage.getItem(KEY); // null on a gateway without API keys
let timers = [];
let mounted = null; // the run view on the run page

function node(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined && text !== null) el.textContent = String(text);
  return el;
}

function cell(row, text, className) {
  const td = node("td", className, text);
  row.append(td);
  return td;
}

function button(text, onClick, className) {
  const el = node("button", className, text);
  el.type = "button";
  el.addEventListener("click", onClick);
  return el;
}

const api = (method, path, options = {}) => request(method, path, { baseUrl: base, apiKey, ...options });
const newKey = () => `console-${crypto.randomUUID()}`;

function when(iso) {
  if (!iso) return "-";
  const date = new Date(iso);
  return new Date().toDateString() === date.toDateString() ? date.toLocaleTimeString() : date.toLocaleString();
}

function seconds(value) {
  if (value === null || !Number.isFinite(value)) return "-";
  if (value < 60) return `${value.toFixed(value < 10 ? 1 : 0)} s`;
  const m = Math.floor(value / 60);
  return m < 60 ? `${m} min ${Math.round(value % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function duration(run) {
  const from = Date.parse(run.started_at ?? "");
  if (!Number.isFinite(from)) return "-";
  const to = run.finished_at ? Date.parse(run.finished_at) : Date.now();
  return seconds((to - from) / 1000);
}

function notice(text, bad = false) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
  el.classList.toggle("bad", bad);
}

function failure(error) {
  if (error instanceof GenxError && error.status === 401) {
    signOut("Your key was refused: sign in again.");
    return;
  }
  notice(error instanceof GenxError ? `${error.code}: ${error.detail}` : String(error), true);
}

// Asks in the page (not window.confirm: one look for every browser), resolves to true or false.
function confirmed(text) {
  return new Promise((resolve) => {
    const box = $("confirm");
    $("confirm-text").textContent = text;
    box.hidden = false;
    const answer = (value) => {
      box.hidden = true;
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      resolve(value);
    };
    $("confirm-yes").onclick = () => answer(true);
    $("confirm-no").onclick = () => answer(false);
    $("confirm-yes").focus();
  });
}

// -- signing in ---------------------------------------------------------------------------------

async function probe() {
  await api("GET", "/v1/runs", { params: { limit: 1 } });
}

async function signIn(submit) {
  submit.preventDefault();
  const key = $("api-key").value.trim();
  $("signin-error").textContent = "";
  if (!key) {
    $("signin-error").textContent = "Enter an API key.";
    return;
  }
  apiKey = key;
  try {
    await probe();
  } catch (error) {
    apiKey = null;
    $("signin-error").textContent = error instanceof GenxError ? `${error.code}: ${error.detail}` : String(error);
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  enter(true);
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  apiKey = null;
  leave();
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
}

function enter(withKey) {
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = !withKey;
  $("who").textContent = withKey ? "signed in" : "open gateway (no API keys)";
  route();
}

// -- pages --------------------------------------------------------------------------------------

function leave() {
  for (const timer of timers) clearInterval(timer);
  timers = [];
  mounted?.close();
  mounted = null;
  notice("");
  $("confirm").hidden = true;
}

function show(name) {
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== `page-${name}`;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("here", link.dataset.page === (name === "run" ? "runs" : name));
  }
}

function route() {
  if (!$("signin").hidden) return;
  leave();
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, id] = hash.split("/");
  if (page === "runs" && id) return showRunPage(decodeURIComponent(id));
  if (page === "schedules") return showSchedules();
  if (page === "cluster") return showCluster();
  return showRuns();
}

// -- runs ---------------------------------------------------------------------------------------

const runs = { filter: {}, cursors: [null], next: null, selected: new Set(), workflows: null };

function readFilter() {
  const tags = $("f-tag").value.split(",").map((t) => t.trim()).filter(Boolean);
  const time = (input) => (input.value ? new Date(input.value).toISOString() : undefined);
  const filter = {
    workflow: $("f-workflow").value || undefined,
    status: $("f-status").value || undefined,
    tag: tags.length ? tags : undefined,
    created_after: time($("f-after")),
    created_before: time($("f-before")),
  };
  return Object.fromEntries(Object.entries(filter).filter(([, v]) => v !== undefined));
}

async function loadWorkflows() {
  if (!runs.workflows) runs.workflows = (await api("GET", "/v1/workflows")).map((w) => w.name);
  for (const select of [$("f-workflow"), $("s-workflow")]) {
    const keep = select.value;
    const first = select.id === "f-workflow" ? [node("option", "", "any")] : [];
    if (first.length) first[0].value = "";
    select.replaceChildren(...first, ...runs.workflows.map((name) => node("option", "", name)));
    select.value = keep;
  }
}

async function showRuns() {
  show("runs");
  try {
    await loadWorkflows();
  } catch (error) {
    failure(error);
  }
  await loadRuns();
  timers.push(setInterval(() => loadRuns(true), REFRESH_MS));
}

async function loadRuns(quiet = false) {
  const cursor = runs.cursors[runs.cursors.length - 1];
  const { status, ...rest } = runs.filter;
  let page;
  let counts;
  try {
    [page, counts] = await Promise.all([
      api("GET", "/v1/runs", { params: { ...runs.filter, limit: PAGE_SIZE, cursor: cursor ?? undefined } }),
      api("GET", "/v1/runs/counts", { params: rest }),
    ]);
  } catch (error) {
    if (!quiet) failure(error);
    return;
  }
  runs.next = page.next_cursor;
  renderRuns(page.runs);
  renderCounts(counts, status);
}

function renderCounts({ counts, complete }, status) {
  const box = $("counts");
  box.replaceChildren();
  for (const name of STATUSES) {
    const chip = node("span", `count status s-${name}`, `${name} ${counts[name] ?? 0}${complete ? "" : "+"}`);
    chip.id = `count-${name}`;
    chip.classList.toggle("chosen", name === status);
    box.append(chip);
  }
}

function renderRuns(list) {
  const body = $("runs").tBodies[0];
  body.replaceChildren();
  for (const run of list) {
    const row = node("tr");
    row.dataset.runId = run.id;
    row.dataset.status = run.status;
    const check = node("input");
    check.type = "checkbox";
    check.checked = runs.selected.has(run.id);
    check.addEventListener("change", () => {
      if (check.checked) runs.selected.add(run.id);
      else runs.selected.delete(run.id);
      renderSelection();
    });
    cell(row, "").append(check);
    const link = node("a", "run-link", run.id);
    link.href = `#/runs/${encodeURIComponent(run.id)}`;
    cell(row, "").append(link);
    cell(row, run.workflow);
    cell(row, "").append(node("span", `status s-${run.status}`, run.status));
    const tags = node("div", "tags");
    for (const [key, value] of Object.entries(run.tags ?? {})) tags.append(node("span", "tag", `${key}:${value}`));
    cell(row, "").append(tags);
    cell(row, when(run.created_at));
    cell(row, duration(run));
    cell(row, run.attempt);
    body.append(row);
  }
  $("runs-empty").hidden = list.length > 0;
  $("page-next").disabled = !runs.next;
  $("page-first").disabled = runs.cursors.length === 1;
  $("page-info").textContent = `page ${runs.cursors.length}`;
  $("select-page").checked = list.length > 0 && list.every((r) => runs.selected.has(r.id));
  renderSelection();
}

function renderSelection() {
  const n = runs.selected.size;
  $("selected").textContent = `${n} selected`;
  $("cancel-selected").disabled = n === 0;
  $("rerun-selected").disabled = n === 0;
}

async function bulk(action, filter, what) {
  const extra = action === "rerun" ? { from: "failed_step" } : {};
  let preview;
  try {
    preview = await api("POST", `/v1/runs/bulk/${action}`, { body: { filter, dry_run: true, ...extra } });
  } catch (error) {
    failure(error);
    return;
  }
  const acted = action === "cancel"
    ? preview.runs.filter((r) => !TERMINAL.includes(r.status)).length
    : preview.runs.filter((r) => !r.error).length;
  if (acted === 0) {
    notice(`No run to ${action}: ${preview.matched} ${what}, none ${action === "cancel" ? "still going" : "ended"}.`);
    return;
  }
  const verb = action === "cancel" ? "Cancel" : "Rerun (each from its failed step)";
  if (!(await confirmed(`${verb} ${acted} run(s), ${what}?`))) return;
  try {
    const done = await api("POST", `/v1/runs/bulk/${action}`, {
      body: { filter, ...extra }, headers: { "Idempotency-Key": newKey() },
    });
    notice(`${done.done} of ${done.matched} run(s) ${action === "cancel" ? "cancelled or asked to stop" : "rerun"}.`);
  } catch (error) {
    failure(error);
    return;
  }
  runs.selected.clear();
  await loadRuns();
}

function wireRuns() {
  $("filters").addEventListener("submit", (submit) => {
    submit.preventDefault();
    runs.filter = readFilter();
    runs.cursors = [null];
    runs.selected.clear();
    loadRuns();
  });
  $("f-clear").addEventListener("click", () => {
    $("filters").reset();
    runs.filter = {};
    runs.cursors = [null];
    loadRuns();
  });
  $("page-next").addEventListener("click", () => {
    if (!runs.next) return;
    runs.cursors.push(runs.next);
    loadRuns();
  });
  $("page-first").addEventListener("click", () => {
    runs.cursors = [null];
    loadRuns();
  });
  $("select-page").addEventListener("change", () => {
    for (const row of $("runs").tBodies[0].rows) {
      if ($("select-page").checked) runs.selected.add(row.dataset.runId);
      else runs.selected.delete(row.dataset.runId);
      row.querySelector("input").checked = $("select-page").checked;
    }
    renderSelection();
  });
  const selected = () => ({ ids: [...runs.selected] });
  $("cancel-selected").addEventListener("click", () => bulk("cancel", selected(), "selected"));
  $("rerun-selected").addEventListener("click", () => bulk("rerun", selected(), "selected"));
  const matching = (action) => () => {
    const filter = readFilter();
    if (!Object.keys(filter).length) {
      notice("Choose a filter first: bulk actions act on the runs a filter chooses.", true);
      return;
    }
    bulk(action, filter, "matching the filter");
  };
  $("cancel-matching").addEventListener("click", matching("cancel"));
  $("rerun-matching").addEventListener("click", matching("rerun"));
}

// -- a run --------------------------------------------------------------------------------------

function showRunPage(runId) {
  show("run");
  const path = `/v1/runs/${encodeURIComponent(runId)}`;
  mounted = mountRun($("page-run"), {
    runId, base, apiKey,
    actions: {
      async cancel() {
        if (!(await confirmed(`Cancel run ${runId}?`))) return;
        try {
          const run = await api("POST", `${path}/cancel`);
          notice(`Run ${run.id} is ${run.status}${run.cancel_requested && run.status === "running" ? " (stopping)" : ""}.`);
        } catch (error) {
          failure(error);
        }
      },
      async rerun(fromStep) {
        const where = fromStep ? `from step ${fromStep} (reusing the steps before it)` : "from the start";
        if (!(await confirmed(`Rerun ${runId} ${where}?`))) return;
        try {
          const run = await api("POST", `${path}/rerun`, { body: { from_step: fromStep } });
          location.hash = `#/runs/${encodeURIComponent(run.id)}`;
          notice(`Rerun ${run.id} started ${where}.`);
        } catch (error) {
          failure(error);
        }
      },
    },
  });
}

// -- schedules ----------------------------------------------------------------------------------

async function showSchedules() {
  show("schedules");
  try {
    await loadWorkflows();
  } catch (error) {
    failure(error);
  }
  await loadSchedules();
}

async function loadSchedules() {
  let list;
  try {
    list = await api("GET", "/v1/schedules");
  } catch (error) {
    failure(error);
    return;
  }
  const body = $("schedules").tBodies[0];
  body.replaceChildren();
  for (const s of list) {
    const row = node("tr");
    row.dataset.scheduleId = s.id;
    cell(row, s.id, "mono");
    cell(row, s.workflow);
    cell(row, s.cron, "mono");
    cell(row, s.timezone);
    cell(row, when(s.next_run_at));
    cell(row, s.paused ? "paused" : "active", s.paused ? "paused" : "");
    const actions = cell(row, "", "row-actions");
    const path = `/v1/schedules/${encodeURIComponent(s.id)}`;
    const act = (method, suffix) => async () => {
      try {
        await api(method, `${path}${suffix}`);
      } catch (error) {
        failure(error);
      }
      await loadSchedules();
    };
    actions.append(
      s.paused ? button("Resume", act("POST", "/resume"), "resume") : button("Pause", act("POST", "/pause"), "pause"),
      button("Delete", async () => {
        if (await confirmed(`Delete schedule ${s.id} (${s.workflow}, ${s.cron})?`)) await act("DELETE", "")();
      }, "delete"),
    );
    body.append(row);
  }
  $("schedules-empty").hidden = list.length > 0;
}

function wireSchedules() {
  $("schedule-form").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    $("s-error").textContent = "";
    let input;
    try {
      input = JSON.parse($("s-input").value || "null");
    } catch {
      $("s-error").textContent = "The input is not JSON.";
      return;
    }
    const body = { workflow: $("s-workflow").value, cron: $("s-cron").value.trim(), timezone: $("s-timezone").value.trim() || "UTC", input };
    try {
      const made = await api("POST", "/v1/schedules", { body });
      notice(`Schedule ${made.id} created: next run ${when(made.next_run_at)}.`);
    } catch (error) {
      $("s-error").textContent = error instanceof GenxError ? error.detail : String(error);
      return;
    }
    await loadSchedules();
  });
}

// -- the cluster --------------------------------------------------------------------------------

async function showCluster() {
  show("cluster");
  await loadCluster();
  timers.push(setInterval(loadCluster, REFRESH_MS));
}

const used = ({ used: n, limit }) => (limit ? `${n} / ${limit}` : `${n} (no limit)`);

async function loadCluster() {
  let state;
  try {
    state = await api("GET", "/v1/cluster");
  } catch (error) {
    failure(error);
    return;
  }
  $("queue-depth").textContent = String(state.queue.depth);
  $("queue-age").textContent = state.queue.depth ? seconds(state.queue.oldest_age_seconds) : "-";
  $("leases").textContent = String(state.leases);
  const workers = $("workers").tBodies[0];
  workers.replaceChildren();
  for (const w of state.workers) {
    const row = node("tr");
    row.dataset.worker = w.name;
    cell(row, w.name, "mono");
    cell(row, w.deployment);
    cell(row, !w.alive ? `gone (${seconds(w.seen_seconds_ago)} ago)` : w.draining ? "draining" : "alive", w.alive ? "" : "bad");
    cell(row, w.runs);
    cell(row, seconds(w.age_seconds));
    const hosts = cell(row, "", "hosts");
    for (const h of w.run_hosts) {
      const state = h.up ? (h.healthy ? "" : ", not answering") : ", starting";
      hosts.append(node("div", "host", `${h.name}: ${h.runs} run(s), up ${seconds(h.age_seconds)}${state}`));
    }
    workers.append(row);
  }
  const budgets = $("budgets").tBodies[0];
  budgets.replaceChildren();
  for (const b of state.llm_budgets) {
    const row = node("tr");
    row.dataset.model = b.model;
    cell(row, b.model, "mono");
    cell(row, used(b.concurrency));
    cell(row, used(b.requests_per_minute));
    cell(row, used(b.tokens_per_minute));
    cell(row, b.paused_seconds ? seconds(b.paused_seconds) : "-");
    cell(row, b.processes_waiting);
    budgets.append(row);
  }
  $("budgets-empty").hidden = state.llm_budgets.length > 0;
}

// -- start ----------------------------------------------------------------------------------------

async function main() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  wireRuns();
  wireSchedules();
  window.addEventListener("hashchange", route);
  try {
    await probe(); // open gateway, or a key kept from before in this tab
    enter(Boolean(apiKey));
  } catch (error) {
    if (error instanceof GenxError && error.status === 401) signOut(apiKey ? "Your key was refused: sign in again." : "");
    else signOut(`The gateway could not be reached: ${error.detail ?? error}`);
  }
  document.body.dataset.ready = "true";
}

main();
