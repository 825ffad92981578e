// The run viewer (GET /ui/runs/{id}?token=...): one run, live, for whoever holds its link. The
// page is the shared run view (run-view.js) mounted with the run token of its own URL.

import { mountRun } from "./run-view.js";

const where = location.pathname.match(/^(.*)\/ui\/runs\/([^/]+)\/?$/);
const base = location.origin + (where ? where[1] : "");
const runId = where ? decodeURIComponent(where[2]) : "";
const token = new URLSearchParams(location.search).get("token");

mountRun(document.getElementById("app"), { runId, base, token, header: document.querySelector("header.bar") });
