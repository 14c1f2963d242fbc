// secateurs dashboard: plain ES module, no dependencies, no build step.
//
// Security rules kept throughout (the Content-Security-Policy enforces the first two):
//   - no inline script or style: this file and app.css only; no style attributes (charts use SVG attributes);
//   - every value from the API reaches the page as text (textContent, createTextNode, setAttribute): no HTML
//     parsing sinks (innerHTML & co. are refused by the policy's Trusted Types rule anyway);
//   - the API key lives in this tab's sessionStorage and only ever travels in an Authorization header: event
//     streams are read with fetch() (EventSource cannot send headers) and artifacts are downloaded with fetch()
//     into a Blob, so the key never appears in a URL.

const KEY_STORE = "secateurs.apiKey";
const ROOT = new URL("../", document.baseURI); // the dashboard is served at <root>/dashboard/
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const METHODS = ["magnitude", "wanda", "sparsegpt"];
const NAMED_SETS = ["c4", "wikitext2", "ptb"];
const LIST_POLL_MS = 2000;
const VERIFY_MAX_BYTES = 256 * 1024 * 1024; // downloads up to this size are hashed in the page

// ---------------------------------------------------------------------------------------------------------
// DOM helpers: elements built from data, never from HTML strings

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = String(v);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = String(dv);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "style" || k.startsWith("on")) throw new Error(`refusing attribute ${k}`);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function clear(el) {
  el.replaceChildren();
  return el;
}

function notify(message) {
  const box = document.getElementById("notice");
  clear(box).append(h("p", { text: message }));
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => clear(box), 5000);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// ---------------------------------------------------------------------------------------------------------
// formatting

const pct = (v) => (v === null || v === undefined ? "—" : `${(100 * v).toFixed(1)} %`);
const num = (v, digits = 4) => (v === null || v === undefined ? "—" : Number(v).toPrecision(digits));

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const t = Math.round(seconds);
  if (t < 60) return `${t} s`;
  if (t < 3600) return `${Math.floor(t / 60)} min ${t % 60} s`;
  return `${Math.floor(t / 3600)} h ${Math.floor((t % 3600) / 60)} min`;
}

// a sweep's targets in one cell: "30 %..70 % (5) + 2:4"
function sweepTargets(req) {
  if (!req || typeof req !== "object") return "";
  const r = Array.isArray(req.sparsities) ? req.sparsities.filter((x) => typeof x === "number").sort((a, b) => a - b) : [];
  const p = Array.isArray(req.patterns) ? req.patterns.map(String) : [];
  const parts = [];
  if (r.length) parts.push(r.length === 1 ? pct(r[0]) : `${pct(r[0])}..${pct(r[r.length - 1])} (${r.length})`);
  if (p.length) parts.push(p.join(", "));
  return parts.join(" + ");
}

const target = (job) => sweepTargets(job.request) || (job.pattern ? job.pattern : job.sparsity !== null && job.sparsity !== undefined ? pct(job.sparsity) : "structured");

function randomKey() {
  // crypto.randomUUID needs a secure context; getRandomValues does not
  const b = crypto.getRandomValues(new Uint8Array(16));
  return "dash-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------------------------------------------------
// the API

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || `HTTP ${problem.status}`);
    this.problem = problem;
    this.status = problem.status;
  }
}

const getKey = () => sessionStorage.getItem(KEY_STORE);

function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), ROOT);
}

const jobPath = (id) => `v1/pruning-jobs/${encodeURIComponent(id)}`;
const artifactPath = (id, name) => `${jobPath(id)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`;

async function problemOf(res) {
  const type = res.headers.get("content-type") || "";
  let body = null;
  try {
    body = type.includes("json") ? await res.json() : { detail: (await res.text()).slice(0, 500) };
  } catch {
    body = {};
  }
  const p = body && typeof body === "object" && !Array.isArray(body) ? body : {};
  return new ApiError({ title: res.statusText || "Request failed", ...p, status: p.status || res.status });
}

async function api(path, { method = "GET", json, body, headers = {}, signal, key = getKey() } = {}) {
  const hs = { Accept: "application/json", ...headers };
  if (key) hs.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    hs["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(apiUrl(path), { method, headers: hs, body, signal, cache: "no-store", credentials: "omit" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError({ title: "The API could not be reached", detail: String(e.message || e), status: 0 });
  }
  if (!res.ok) {
    const err = await problemOf(res);
    if (err.status === 401 && key === getKey()) keyRefused(err);
    throw err;
  }
  return res.status === 204 ? null : res.json();
}

function keyRefused(err) {
  sessionStorage.removeItem(KEY_STORE);
  showKeyState();
  keyView(err);
}

// A job's events over Server-Sent Events, read with fetch() so the request carries the Authorization header.
// Reconnects with Last-Event-ID after a dropped connection (waiting the server's `retry:`), and returns once the
// server ends the stream (after the job's terminal status event, or when it shuts down).
async function followEvents(jobId, lastId, onEvent, signal) {
  let retry = 2000;
  for (;;) {
    if (signal.aborted) return lastId;
    try {
      const hs = { Accept: "text/event-stream", Authorization: `Bearer ${getKey()}` };
      if (lastId !== null) hs["Last-Event-ID"] = String(lastId);
      const res = await fetch(apiUrl(`${jobPath(jobId)}/events/stream`), {
        headers: hs, signal, cache: "no-store", credentials: "omit",
      });
      if (res.status === 429) {
        await sleep(1000 * Number(res.headers.get("retry-after") || 5), signal);
        continue;
      }
      if (!res.ok) throw await problemOf(res);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let ev = { id: null, event: "message", data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return lastId;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (ev.id !== null) lastId = ev.id;
            if (ev.data.length) onEvent(ev.event, JSON.parse(ev.data.join("\n")));
            ev = { id: null, event: "message", data: [] };
            continue;
          }
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") ev.id = val;
          else if (field === "event") ev.event = val;
          else if (field === "data") ev.data.push(val);
          else if (field === "retry" && /^\d+$/.test(val)) retry = Number(val);
        }
      }
    } catch (e) {
      if (signal.aborted) return lastId;
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e;
      await sleep(retry, signal); // dropped connection or 5xx: reconnect from the last event seen
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// problems (RFC 9457) shown with the fields they name

const fieldOf = (loc) => (loc || []).filter((p, i) => !(i === 0 && (p === "body" || p === "query"))).join(".");

function problemBox(err) {
  const p = err instanceof ApiError ? err.problem : { title: "Error", detail: String(err?.message || err) };
  const box = h("div", { class: "problem", role: "alert", data: { problem: p.code || p.status || "error" } },
    h("strong", { text: p.status ? `${p.title} (${p.status})` : p.title }));
  if (p.detail) box.append(h("p", { text: p.detail }));
  if (Array.isArray(p.errors) && p.errors.length) {
    box.append(h("ul", {}, p.errors.map((e) => {
      const f = fieldOf(e.loc);
      return h("li", { data: { field: f } }, f ? h("code", { text: f }) : null, f ? ": " : "", e.msg);
    })));
  }
  return box;
}

function markFields(form, err) {
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const el of form.querySelectorAll(".field-error")) el.remove();
  const errors = err instanceof ApiError && Array.isArray(err.problem.errors) ? err.problem.errors : [];
  let first = null;
  for (const e of errors) {
    // the most specific input the error's location names: calibration.texts.0 -> calibration.texts
    const parts = fieldOf(e.loc).split(".");
    let el = null;
    while (parts.length && !el) {
      el = form.querySelector(`:is(input, select, textarea, fieldset)[data-field="${CSS.escape(parts.join("."))}"]`);
      parts.pop();
    }
    if (!el) continue;
    el.setAttribute("aria-invalid", "true");
    const id = `${el.id || "field"}-error-${Math.random().toString(36).slice(2, 8)}`;
    const msg = h("span", { class: "field-error", id, text: e.msg });
    (el.closest(".field") || el).append(msg);
    el.setAttribute("aria-describedby", id);
    first ??= el;
  }
  first?.focus?.();
}

// ---------------------------------------------------------------------------------------------------------
// views: one at a time; each returns a dispose() that stops its timers and streams

const view = () => document.getElementById("view");
let disposeView = () => {};

function setView(title, ...children) {
  disposeView();
  disposeView = () => {};
  document.title = `${title} · secateurs`;
  clear(view()).append(...children);
  for (const a of document.querySelectorAll(".top nav a")) {
    if (a.getAttribute("href") === location.hash || (a.id === "nav-jobs" && /^#\/jobs\/./.test(location.hash))) {
      a.setAttribute("aria-current", "page");
    } else a.removeAttribute("aria-current");
  }
}

function showKeyState() {
  const has = !!getKey();
  document.getElementById("key-state").textContent = has ? "API key set for this tab" : "No API key";
  document.getElementById("forget-key").hidden = !has;
}

function route() {
  showKeyState();
  if (!getKey()) return keyView();
  const hash = location.hash || "#/jobs";
  const m = hash.match(/^#\/jobs\/([A-Za-z0-9_-]+)$/);
  if (m) return jobView(m[1]);
  if (hash === "#/new") return newJobView();
  return jobsView();
}

// --- the API key ------------------------------------------------------------------------------------------

function keyView(err) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false",
    placeholder: "sct_…", "aria-describedby": "api-key-hint",
  });
  const errors = h("div");
  const form = h("form", { class: "card", id: "key-form" },
    h("h2", { text: "API key" }),
    err ? problemBox(err) : null,
    errors,
    h("div", { class: "row" },
      h("div", { class: "field wide" },
        h("label", { for: "api-key", text: "API key" }),
        input,
        h("span", { class: "hint", id: "api-key-hint",
          text: "Kept in this tab only (sessionStorage) and sent as an Authorization header; closing the tab forgets it." }))),
    h("button", { type: "submit", text: "Use this key" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    clear(errors);
    try {
      await api("v1/pruning-jobs?limit=1", { key });
      sessionStorage.setItem(KEY_STORE, key);
      if (!location.hash) history.replaceState(null, "", "#/jobs"); // no hashchange: one render
      route();
    } catch (e) {
      errors.append(problemBox(e));
      input.focus();
    }
  });
  setView("API key", form);
  input.focus();
}

// --- the jobs list ----------------------------------------------------------------------------------------

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, data: { status }, text: status });
}

function fractionOf(job) {
  if (job.status === "succeeded") return 1;
  return job.progress?.fraction ?? 0;
}

function progressCell(job) {
  const f = fractionOf(job);
  const label = `${Math.round(100 * f)} %`;
  return h("div", { class: "progress" },
    h("progress", { max: "1", value: String(f), "aria-label": `progress of ${job.id}`, data: { fraction: f } }),
    h("span", { class: "pct", text: label }));
}

function jobsView() {
  const ctl = new AbortController();
  let limit = 20;
  const tbody = h("tbody");
  const errors = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true, text: "Show more jobs" });
  const table = h("table", { id: "jobs" },
    h("caption", { text: "Newest first; status and progress refresh by themselves." }),
    h("thead", {}, h("tr", {}, ["Job", "Model", "Method", "Target", "Status", "Progress", "Created"].map((t) => h("th", { scope: "col", text: t })))),
    tbody);
  setView("Jobs",
    h("div", { class: "actions" }, h("h2", { text: "Pruning jobs" }), h("a", { href: "#/new", class: "button", text: "New job" })),
    errors,
    h("section", { class: "card" }, table, more));
  more.addEventListener("click", () => { limit = Math.min(100, limit + 20); refresh(); });

  async function refresh() {
    try {
      const page = await api(`v1/pruning-jobs?limit=${limit}`, { signal: ctl.signal });
      clear(errors);
      const rows = page.data.map((job) => h("tr", { data: { jobId: job.id, status: job.status } },
        h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono", text: job.id })),
        h("td", { class: "mono", text: job.model }),
        h("td", { text: job.method }),
        h("td", { text: target(job) }),
        h("td", {}, statusBadge(job.status)),
        h("td", {}, progressCell(job)),
        h("td", { text: when(job.timestamps.created_at) })));
      tbody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "7", class: "muted", text: "No jobs yet." }))]));
      more.hidden = !page.has_more || limit >= 100;
    } catch (e) {
      if (e.name === "AbortError" || e.status === 401) return;
      errors.replaceChildren(problemBox(e));
    }
  }

  (async () => {
    while (!ctl.signal.aborted) {
      await refresh();
      await sleep(LIST_POLL_MS, ctl.signal);
    }
  })();
  disposeView = () => ctl.abort();
}

// --- one job ----------------------------------------------------------------------------------------------

// Metric sections of the job page, each `metrics -> element | null`, drawn in this order from the job's metrics
// summary.
const METRIC_SECTIONS = [sparsitySection, perplexitySection, recoverySection, tasksSection, sweepSection];

function jobView(id) {
  const ctl = new AbortController();
  let job = null;
  let sseEvents = 0;
  const heading = h("h2", { class: "mono", text: id });
  const badge = h("span");
  const errors = h("div");
  const facts = h("dl", { class: "facts" });
  const bar = h("progress", { id: "job-progress", max: "1", value: "0", "aria-labelledby": "job-progress-label" });
  const pctText = h("span", { class: "pct", id: "job-progress-pct", text: "0 %" });
  const detail = h("p", { class: "progress-detail", id: "job-progress-detail", "aria-live": "polite" });
  const progressBox = h("section", { class: "card", id: "progress", data: { sseEvents: 0, fraction: 0 } },
    h("h3", { id: "job-progress-label", text: "Progress" }),
    h("div", { class: "progress" }, bar, pctText), detail);
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job", text: "Cancel job" });
  const failure = h("div");
  const metricsBox = h("div", { class: "grid", id: "metrics" });
  const artifactsBox = h("section", { class: "card", id: "artifacts" }, h("h3", { text: "Artifacts" }),
    h("p", { class: "muted", text: "Published when the job succeeds." }));
  const log = h("ol", { class: "log", id: "events" });

  setView(id,
    h("p", {}, h("a", { href: "#/jobs", text: "← All jobs" })),
    h("div", { class: "actions" }, heading, badge),
    errors,
    h("section", { class: "card" }, h("h3", { text: "Job" }), facts, h("div", { class: "actions" }, cancel)),
    failure,
    progressBox,
    metricsBox,
    artifactsBox,
    h("section", { class: "card" }, h("h3", { text: "Events" }), log));

  function setProgress(p, status) {
    const f = status === "succeeded" ? 1 : Math.max(0, Math.min(1, p?.fraction ?? 0));
    bar.value = f;
    bar.setAttribute("aria-valuetext", `${Math.round(100 * f)} %`);
    progressBox.dataset.fraction = String(f);
    pctText.textContent = `${Math.round(100 * f)} %`;
    const parts = [];
    if (status && TERMINAL.has(status)) parts.push(status === "succeeded" ? "done" : status);
    else if (p) {
      if (p.stage) parts.push(p.stage);
      if (p.block !== null && p.block !== undefined && p.total_blocks) parts.push(`block ${p.block + 1}/${p.total_blocks}`);
      if (p.message) parts.push(p.message);
      if (p.eta_seconds) parts.push(`about ${duration(p.eta_seconds)} left`);
    } else if (status === "queued") parts.push("waiting for a worker");
    detail.textContent = parts.join(" · ");
  }

  function renderJob(j) {
    job = j;
    badge.replaceChildren(statusBadge(j.status));
    document.title = `${j.id} (${j.status}) · secateurs`;
    const ts = j.timestamps || {};
    const rows = [
      ["Status", j.status],
      ["Model", j.model],
      ["Method", j.method],
      ["Target", target(j)],
      ["Created", when(ts.created_at)],
      ["Started", when(ts.running_at)],
      ["Finished", when(ts.finished_at)],
      ["Attempt", `${j.attempt} of ${j.max_attempts}`],
    ];
    const cal = j.request?.calibration;
    if (cal) rows.push(["Calibration", `${cal.source || cal.calibration_set_id || (cal.texts ? "inline text" : "c4")} · ${cal.nsamples ?? 128} × ${cal.seqlen ?? 2048} tokens`]);
    for (const [k, v] of Object.entries(j.metadata || {})) rows.push([`metadata.${k}`, v]);
    facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
    cancel.hidden = TERMINAL.has(j.status);
    cancel.disabled = j.status === "cancelling" || j.cancel_requested;
    setProgress(j.progress, j.status);
    failure.replaceChildren();
    if (j.error) {
      failure.append(h("section", { class: "problem", role: "alert", id: "job-error" },
        h("strong", { text: `Failed: ${j.error.code}` }), h("p", { text: j.error.message })));
    }
    metricsBox.replaceChildren(...(j.metrics ? METRIC_SECTIONS.map((f) => f(j.metrics)).filter(Boolean) : []));
  }

  function logEvent(type, e) {
    const d = e.data || {};
    let text = null;
    if (type === "status") text = `status: ${d.status}${d.reason ? ` (${d.reason})` : ""}`;
    else if (type === "log") text = d.message;
    else if (type === "metrics") text = "metrics recorded";
    if (text === null || text === undefined) return;
    log.append(h("li", { data: { type } }, h("time", { datetime: e.created_at || "", text: when(e.created_at) }), String(text)));
    while (log.children.length > 200) log.firstElementChild.remove();
  }

  async function reload() {
    const j = await api(jobPath(id), { signal: ctl.signal });
    renderJob(j);
    if (j.status === "succeeded") await loadArtifacts();
    return j;
  }

  async function loadArtifacts() {
    const list = await api(`${jobPath(id)}/artifacts`, { signal: ctl.signal });
    artifactsBox.replaceChildren(h("h3", { text: "Artifacts" }), artifactTable(id, list.data));
  }

  function onEvent(type, e) {
    sseEvents += 1;
    progressBox.dataset.sseEvents = String(sseEvents);
    logEvent(type, e);
    if (type === "progress") setProgress(e.data, job?.status);
    else if (type === "status" || type === "metrics") {
      if (type === "status" && job) renderJob({ ...job, status: e.data.status });
      reload().catch(showError);
    }
  }

  function showError(e) {
    if (e.name === "AbortError" || e.status === 401) return;
    errors.replaceChildren(problemBox(e));
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      renderJob(await api(`${jobPath(id)}/cancel`, { method: "POST", signal: ctl.signal }));
      notify("Cancellation requested.");
    } catch (e) {
      showError(e);
      cancel.disabled = false;
    }
  });

  (async () => {
    try {
      let j = await reload();
      let lastId = null;
      while (!TERMINAL.has(j.status) && !ctl.signal.aborted) {
        lastId = await followEvents(id, lastId, onEvent, ctl.signal);
        if (ctl.signal.aborted) return;
        j = await reload(); // the stream ended: after the terminal event, or the server went away
        if (!TERMINAL.has(j.status)) await sleep(1000, ctl.signal);
      }
    } catch (e) {
      showError(e);
    }
  })();
  disposeView = () => ctl.abort();
}

function artifactTable(jobId, artifacts) {
  if (!artifacts.length) return h("p", { class: "muted", text: "No artifacts." });
  const total = artifacts.reduce((a, x) => a + x.size, 0);
  return h("table", {},
    h("caption", { text: `${artifacts.length} files, ${bytes(total)}; each download is checked against its sha256.` }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "File" }), h("th", { scope: "col", text: "Kind" }),
      h("th", { scope: "col", class: "num", text: "Size" }), h("th", { scope: "col", text: "SHA-256" }), h("th", { scope: "col", text: "" }))),
    h("tbody", {}, artifacts.map((a) => {
      const state = h("span", { class: "muted", "aria-live": "polite" });
      const button = h("button", { type: "button", class: "secondary", data: { artifact: a.name }, "aria-label": `Download ${a.name}`, text: "Download" });
      button.addEventListener("click", () => download(jobId, a, button, state));
      return h("tr", { data: { artifact: a.name } },
        h("td", { class: "mono", text: a.name }),
        h("td", { text: a.kind }),
        h("td", { class: "num", text: bytes(a.size), title: `${a.size} bytes` }),
        h("td", { class: "mono", title: a.sha256, text: `${a.sha256.slice(0, 12)}…` }),
        h("td", {}, h("div", { class: "actions" }, button, state)));
    })));
}

async function download(jobId, art, button, state) {
  button.disabled = true;
  state.textContent = "downloading…";
  try {
    // Local storage answers the file; S3 storage answers 307 to a presigned URL on the storage's origin, which
    // fetch() follows without the Authorization header (the Fetch standard drops it on a cross-origin redirect):
    // the bucket's CORS rules must allow this origin, and the CSP's connect-src names the storage endpoint.
    let res;
    try {
      res = await fetch(apiUrl(artifactPath(jobId, art.name)), {
        headers: { Authorization: `Bearer ${getKey()}` }, cache: "no-store", credentials: "omit",
      });
    } catch (e) {
      throw new ApiError({ title: "Download failed", status: 0,
        detail: `${e.message || e} (for S3 storage: does the bucket's CORS configuration allow ${location.origin}?)` });
    }
    if (!res.ok) throw await problemOf(res);
    const blob = await res.blob();
    let verified = "";
    if (blob.size !== art.size) throw new ApiError({ title: "Download incomplete", status: 0, detail: `${blob.size} of ${art.size} bytes` });
    if (crypto.subtle && blob.size <= VERIFY_MAX_BYTES) {
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
      const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
      if (hex !== art.sha256) throw new ApiError({ title: "Checksum mismatch", status: 0, detail: `sha256 ${hex}, expected ${art.sha256}` });
      verified = "sha256 verified";
    }
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: art.name.split("/").pop(), class: "visually-hidden", text: art.name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    state.textContent = verified || "saved";
    state.dataset.verified = verified ? "true" : "false";
  } catch (e) {
    state.replaceChildren(problemBox(e));
  } finally {
    button.disabled = false;
  }
}

// --- metric sections ----------------------------------------------------------------------------------------

function sparsitySection(m) {
  if (m.sweep) return null; // a sweep has one schedule per target: its own card shows them
  const blocks = Array.isArray(m.block_sparsity) ? m.block_sparsity : null;
  const facts = h("dl", { class: "facts" },
    h("dt", { text: "Achieved sparsity" }), h("dd", { id: "achieved-sparsity", text: pct(m.achieved_sparsity) }));
  if (m.pruned_weights !== undefined) facts.append(h("dt", { text: "Pruned weights" }), h("dd", { text: Number(m.pruned_weights).toLocaleString() }));
  if (m.timings?.total !== undefined) facts.append(h("dt", { text: "Run time" }), h("dd", { text: duration(m.timings.total) }));
  return h("section", { class: "card", id: "block-sparsity" },
    h("h3", { text: "Sparsity per block" }),
    facts,
    blocks && blocks.length ? barChart(blocks) : h("p", { class: "muted", text: "No per-block sparsity in this job's metrics." }));
}

const W = 480;
const H = 220;
const PAD = { left: 52, right: 12, top: 12, bottom: 38 };

function barChart(values) {
  const iw = W - PAD.left - PAD.right;
  const ih = H - PAD.top - PAD.bottom;
  const y = (v) => PAD.top + ih * (1 - v);
  const step = iw / values.length;
  const bw = Math.max(1, step * 0.8);
  const min = Math.min(...values);
  const max = Math.max(...values);
  const grid = s("g", { class: "grid" });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    grid.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: y(t), y2: y(t) }),
      s("text", { x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end", text: `${t * 100} %` }));
  }
  const every = Math.ceil(values.length / 16);
  const bars = s("g", { class: "bars" });
  values.forEach((v, i) => {
    const val = Math.max(0, Math.min(1, Number(v) || 0));
    bars.append(s("rect", {
      class: "bar", x: PAD.left + i * step + (step - bw) / 2, y: y(val), width: bw, height: ih * val,
      data: { block: i, sparsity: val },
    }, s("title", { text: `block ${i}: ${pct(val)}` })));
    if (i % every === 0) bars.append(s("text", { x: PAD.left + (i + 0.5) * step, y: H - PAD.bottom + 17, "text-anchor": "middle", text: i }));
  });
  const svg = s("svg", {
    class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: "block-chart",
    "aria-label": `Sparsity of each of ${values.length} blocks, from ${pct(min)} to ${pct(max)}`,
  }, grid, bars, s("text", { x: PAD.left + iw / 2, y: H - 4, "text-anchor": "middle", class: "label", text: "block" }));
  return h("figure", { class: "chart" }, svg, h("figcaption", { text: `${values.length} blocks: the sparsity each was pruned to.` }));
}

function perplexitySection(m) {
  const p = m.perplexity;
  if (!p || (p.dense === undefined && p.pruned === undefined)) return null;
  if (m.sweep) return null; // a sweep's perplexities, dense included, are in its own card
  const proto = p.protocol || {};
  const facts = h("dl", { class: "facts" },
    h("dt", { text: "Dense" }), h("dd", { id: "ppl-dense", text: num(p.dense) }),
    h("dt", { text: "Pruned" }), h("dd", { id: "ppl-pruned", text: num(p.pruned) }));
  if (typeof p.recovered === "number") facts.append(h("dt", { text: "Recovered" }), h("dd", { id: "ppl-recovered", text: num(p.recovered) }));
  const last = typeof p.recovered === "number" ? p.recovered : p.pruned;
  if (p.dense && last) facts.append(h("dt", { text: "Ratio" }), h("dd", { text: `× ${(last / p.dense).toFixed(2)}` }));
  if (proto.windows) {
    const source = proto.source ? String(proto.source) : "";
    const short = source.split("/").pop(); // an uploaded set's path on the worker: its file name says enough
    facts.append(h("dt", { text: "Protocol" }), h("dd", { title: source || null, text: `${proto.windows} windows × ${proto.seqlen} tokens${short ? ` of ${short}` : ""}` }));
  }
  const vals = [["dense", p.dense], ["pruned", p.pruned], ["recovered", p.recovered]].filter(([, v]) => typeof v === "number");
  if (!vals.length) return h("section", { class: "card", id: "perplexity" }, h("h3", { text: "Perplexity" }), facts);
  const top = Math.max(...vals.map(([, v]) => v)) * 1.15 || 1;
  const bh = 26;
  const svg = s("svg", { class: "chart compact", viewBox: `0 0 ${W} ${vals.length * (bh + 12) + 8}`, role: "img", "aria-label": `Perplexity: ${vals.map(([k, v]) => `${k} ${num(v)}`).join(", ")}` },
    vals.map(([k, v], i) => s("g", {},
      s("text", { x: 76, y: 8 + i * (bh + 12) + bh / 2 + 5, "text-anchor": "end", class: "label", text: k }),
      s("rect", { class: k === "dense" ? "bar dense" : "bar", x: 82, y: 8 + i * (bh + 12), height: bh, width: Math.max(1, (W - 160) * (v / top)), data: { ppl: k } }),
      s("text", { x: 88 + Math.max(1, (W - 160) * (v / top)), y: 8 + i * (bh + 12) + bh / 2 + 5, class: "label", text: num(v) }))));
  return h("section", { class: "card", id: "perplexity" }, h("h3", { text: "Perplexity (lower is better)" }), facts, h("figure", { class: "chart" }, svg));
}

function recoverySection(m) {
  const r = m.recovery;
  if (!r || !r.config) return null;
  const cfg = r.config;
  const facts = h("dl", { class: "facts" },
    h("dt", { text: "Mode" }), h("dd", { text: `${cfg.mode}${cfg.distill ? " + distill" : ""}` }),
    h("dt", { text: "Steps" }), h("dd", { id: "recovery-steps", text: String(r.steps ?? "—") }),
    h("dt", { text: "Learning rate" }), h("dd", { text: String(cfg.lr ?? "—") }),
    h("dt", { text: "Tokens seen" }), h("dd", { text: r.tokens_seen ? Number(r.tokens_seen).toLocaleString("en") : "—" }),
    h("dt", { text: "Masks held" }), h("dd", { text: r.mask_violations ? `${r.mask_violations} violations` : "exactly" }),
    h("dt", { text: "Time" }), h("dd", { text: r.seconds ? duration(r.seconds) : "—" }));
  const curve = (r.loss_curve || []).filter((p) => typeof p.step === "number" && typeof p.loss === "number");
  const parts = [h("h3", { text: "Recovery fine-tuning" }), facts];
  if (curve.length > 1) parts.push(lossChart(curve));
  return h("section", { class: "card", id: "recovery" }, ...parts);
}

function lossChart(curve) {
  const iw = W - PAD.left - PAD.right;
  const ih = H - PAD.top - PAD.bottom;
  const steps = curve.map((p) => p.step);
  const losses = curve.map((p) => p.loss);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [lo, hi] = [Math.min(...losses), Math.max(...losses)];
  const xPos = (v) => PAD.left + iw * (x1 === x0 ? 0 : (v - x0) / (x1 - x0));
  const yPos = (v) => PAD.top + ih * (1 - (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * 0.92);
  const grid = s("g", { class: "grid" });
  for (const v of [x0, x1]) grid.append(s("text", { x: xPos(v), y: H - PAD.bottom + 17, "text-anchor": v === x1 ? "end" : "start", text: String(v) }));
  for (const v of [lo, hi]) grid.append(s("text", { x: PAD.left - 6, y: yPos(v) + 4, "text-anchor": "end", text: num(v, 3) }));
  const line = s("polyline", { class: "curve", points: curve.map((p) => `${xPos(p.step)},${yPos(p.loss)}`).join(" ") });
  const dots = curve.map((p) => s("circle", { class: "point", cx: xPos(p.step), cy: yPos(p.loss), r: 2.5, data: { step: p.step } },
    s("title", { text: `step ${p.step}: loss ${num(p.loss)}` })));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: "loss-chart",
    "aria-label": `Training loss over ${curve.length} points, from ${num(losses[0], 3)} to ${num(losses[losses.length - 1], 3)}` },
  grid, line, ...dots, s("text", { x: PAD.left + iw / 2, y: H - 4, "text-anchor": "middle", class: "label", text: "step" }));
  return h("figure", { class: "chart" }, svg, h("figcaption", { text: "Training loss (running mean between points)." }));
}

function tasksSection(m) {
  const t = m.tasks;
  if (!t) return null;
  const stages = ["dense", "pruned", "recovered"].filter((k) => t[k] && typeof t[k] === "object");
  if (!stages.length) return null;
  const rows = [];
  const names = [...new Set(stages.flatMap((k) => Object.keys(t[k])))].sort();
  for (const name of names) {
    const metrics = [...new Set(stages.flatMap((k) => Object.keys(t[k][name] || {})))].filter((k) => !k.endsWith("_stderr")).sort();
    for (const metric of metrics) {
      rows.push(h("tr", { data: { task: name, metric } },
        h("td", { class: "mono", text: name }), h("td", { text: metric }),
        ...stages.map((k) => {
          const v = t[k][name]?.[metric];
          const se = t[k][name]?.[`${metric}_stderr`];
          return h("td", { class: "num", text: typeof v === "number" ? `${num(v)}${typeof se === "number" ? ` ± ${num(se, 2)}` : ""}` : "—" });
        })));
    }
  }
  const table = h("table", { id: "task-table" },
    h("thead", {}, h("tr", {}, ["Task", "Metric", ...stages].map((x, i) => h("th", { scope: "col", class: i > 1 ? "num" : null, text: x })))),
    h("tbody", {}, rows));
  const note = t.lm_eval_version ? h("p", { class: "muted", text: `lm-eval ${t.lm_eval_version}${t.num_fewshot ? `, ${t.num_fewshot}-shot` : ""}${t.limit ? `, limit ${t.limit}` : ""}` }) : null;
  return h("section", { class: "card wide", id: "tasks" }, h("h3", { text: "Tasks (lm-evaluation-harness)" }), table, note);
}

function sweepSection(m) {
  const sw = m.sweep;
  if (!sw || !Array.isArray(sw.points) || !sw.points.length) return null;
  const pts = sw.points.filter((p) => typeof p.achieved_sparsity === "number");
  const plotted = pts.filter((p) => typeof p.perplexity === "number").sort((a, b) => a.achieved_sparsity - b.achieved_sparsity);
  const table = h("table", {},
    h("thead", {}, h("tr", {}, ["Target", "Achieved", "Perplexity", "Exported"].map((t, i) => h("th", { scope: "col", class: i ? "num" : null, text: t })))),
    h("tbody", {}, sw.points.map((p) => h("tr", { data: { target: p.target } },
      h("td", { text: typeof p.target === "number" ? pct(p.target) : String(p.target) }),
      h("td", { class: "num", text: pct(p.achieved_sparsity) }),
      h("td", { class: "num", text: num(p.perplexity) }),
      h("td", { class: "num", text: p.exported ? "yes" : "no" })))));
  const parts = [h("h3", { text: "Sweep: perplexity against sparsity" })];
  if (plotted.length) parts.push(sweepChart(plotted, sw.dense_perplexity));
  parts.push(table);
  return h("section", { class: "card wide", id: "sweep" }, ...parts);
}

function sweepChart(points, dense) {
  const iw = W - PAD.left - PAD.right;
  const ih = H - PAD.top - PAD.bottom;
  const ys = points.map((p) => p.perplexity).concat(typeof dense === "number" ? [dense] : []);
  const lo = Math.min(...ys);
  const hi = Math.max(...ys);
  const log = lo > 0 && hi / lo > 20; // perplexity explodes at high sparsity: a log axis keeps the low end readable
  const f = (v) => (log ? Math.log10(v) : v);
  const y0 = log ? f(lo) : 0;
  const y1 = f(hi) === y0 ? y0 + 1 : f(hi);
  const yPos = (v) => PAD.top + ih * (1 - (f(v) - y0) / (y1 - y0) * 0.92);
  const xPos = (v) => PAD.left + iw * v;
  const grid = s("g", { class: "grid" });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    grid.append(s("line", { x1: xPos(t), x2: xPos(t), y1: PAD.top, y2: PAD.top + ih }),
      s("text", { x: xPos(t), y: H - PAD.bottom + 17, "text-anchor": t === 1 ? "end" : "middle", text: `${t * 100} %` }));
  }
  for (const v of [lo, hi]) grid.append(s("text", { x: PAD.left - 6, y: yPos(v) + 4, "text-anchor": "end", text: num(v, 3) }));
  const g = s("g", {});
  if (typeof dense === "number") {
    g.append(s("line", { class: "reference", x1: PAD.left, x2: W - PAD.right, y1: yPos(dense), y2: yPos(dense) }),
      s("text", { x: W - PAD.right - 4, y: yPos(dense) - 4, "text-anchor": "end", text: `dense ${num(dense)}` }));
  }
  // the curve joins the unstructured ratios; N:M patterns are points of their own, labelled
  const ratios = points.filter((p) => typeof p.target === "number");
  if (ratios.length > 1) g.append(s("polyline", { class: "curve", points: ratios.map((p) => `${xPos(p.achieved_sparsity)},${yPos(p.perplexity)}`).join(" ") }));
  for (const p of points) {
    const nm = typeof p.target !== "number";
    const label = nm ? String(p.target) : pct(p.target);
    const cls = ["point", nm ? "nm" : null, p.exported ? "exported" : null].filter(Boolean).join(" ");
    g.append(s("circle", { class: cls, cx: xPos(p.achieved_sparsity), cy: yPos(p.perplexity), r: 4.5, data: { target: p.target } },
      s("title", { text: `${label}: ${pct(p.achieved_sparsity)} sparse, perplexity ${num(p.perplexity)}${p.exported ? " (exported)" : ""}` })));
    if (nm) g.append(s("text", { class: "label", x: xPos(p.achieved_sparsity) + 8, y: yPos(p.perplexity) + 4, text: label }));
  }
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: "sweep-chart",
    "aria-label": `Perplexity against achieved sparsity for ${points.length} sweep points${log ? " (log scale)" : ""}` },
  grid, g, s("text", { x: PAD.left + iw / 2, y: H - 4, "text-anchor": "middle", class: "label", text: "achieved sparsity" }));
  return h("figure", { class: "chart" }, svg, h("figcaption", { text: `The line joins the unstructured ratios; N:M patterns are labelled points. Filled points were exported.${log ? " Perplexity on a log scale." : ""}` }));
}

// --- a new job and the calibration sets ------------------------------------------------------------------

function field(id, label, input, hint) {
  input.id = id;
  const parts = [h("label", { for: id, text: label }), input];
  if (hint) {
    input.setAttribute("aria-describedby", `${id}-hint`);
    parts.push(h("span", { class: "hint", id: `${id}-hint`, text: hint }));
  }
  return h("div", { class: "field" }, ...parts);
}

function radio(name, value, label, checked) {
  const id = `${name}-${value}`;
  return h("label", { class: "choice", for: id }, h("input", { type: "radio", name, value, id, checked }), label);
}

function newJobView() {
  const ctl = new AbortController();
  const errors = h("div", { id: "form-errors" });
  const model = h("input", { name: "model", required: true, autocomplete: "off", data: { field: "model" }, placeholder: "org/name, s3://… or an allowed local path" });
  const method = h("select", { name: "method", data: { field: "method" } }, METHODS.map((m) => h("option", { value: m, selected: m === "wanda", text: m })));
  const sparsity = h("input", { name: "sparsity", type: "number", min: "0", max: "0.99", step: "0.05", value: "0.5", data: { field: "sparsity" } });
  const pattern = h("input", { name: "pattern", value: "2:4", pattern: "\\d+:\\d+", data: { field: "pattern" } });
  const sweepRatios = h("input", { name: "sparsities", value: "0.3, 0.4, 0.5, 0.6, 0.7", data: { field: "sparsities" } });
  const sweepPatterns = h("input", { name: "patterns", placeholder: "none", data: { field: "patterns" } });
  const sweepExport = h("input", { name: "export", placeholder: "none: metrics only", data: { field: "export_sparsities" } });
  const calSource = h("select", { name: "cal-source", data: { field: "calibration.source" } }, NAMED_SETS.map((n) => h("option", { value: n, text: n })));
  const calSet = h("select", { name: "cal-set", data: { field: "calibration.calibration_set_id" } });
  const calText = h("textarea", { name: "cal-text", data: { field: "calibration.texts" }, placeholder: "Paste text; blank lines separate documents." });
  const nsamples = h("input", { name: "nsamples", type: "number", min: "1", value: "128", data: { field: "calibration.nsamples" } });
  const seqlen = h("input", { name: "seqlen", type: "number", min: "2", value: "2048", data: { field: "calibration.seqlen" } });
  const evalSel = h("select", { name: "evaluation", data: { field: "evaluation" } });
  const evalWindows = h("input", { name: "eval-windows", type: "number", min: "1", placeholder: "all", data: { field: "evaluation.max_windows" } });
  const submit = h("button", { type: "submit", id: "create-job", text: "Create job" });
  let idempotencyKey = randomKey();

  const targetSet = h("fieldset", { data: { field: "target" } }, h("legend", { text: "Target" }),
    h("div", { class: "row" }, radio("target", "sparsity", "Unstructured sparsity", true), radio("target", "pattern", "N:M pattern", false),
      radio("target", "sweep", "Sweep", false)),
    h("div", { class: "row" }, field("f-sparsity", "Sparsity (0–0.99)", sparsity), field("f-pattern", "Pattern", pattern, "e.g. 2:4 or 4:8")),
    h("div", { class: "row" }, field("f-sparsities", "Sweep ratios", sweepRatios, "comma-separated, up to 16"),
      field("f-patterns", "Sweep patterns", sweepPatterns, "comma-separated N:M, e.g. 2:4, 4:8"),
      field("f-export", "Export the models of", sweepExport, "some of the ratios or patterns above")));
  const calSetField = field("f-cal-set", "Uploaded calibration set", calSet);
  const calibration = h("fieldset", { data: { field: "calibration" } }, h("legend", { text: "Calibration" }),
    h("div", { class: "row" }, radio("cal", "named", "Named set", false), radio("cal", "set", "Uploaded set", false), radio("cal", "texts", "Inline text", true)),
    h("div", { class: "row" }, field("f-cal-source", "Named set", calSource, "needs the datasets extra and the hub"), calSetField),
    h("div", { class: "row" }, h("div", { class: "field wide" }, h("label", { for: "f-cal-texts", text: "Inline text" }), calText)),
    h("div", { class: "row" }, field("f-nsamples", "Windows (nsamples)", nsamples), field("f-seqlen", "Tokens per window (seqlen)", seqlen)));
  calText.id = "f-cal-texts";
  const evaluation = h("fieldset", {}, h("legend", { text: "Evaluation (perplexity before and after)" }),
    h("div", { class: "row" }, field("f-eval", "Evaluate on", evalSel), field("f-eval-windows", "At most windows", evalWindows)));
  const form = h("form", { class: "card", id: "new-job", novalidate: true },
    h("h2", { text: "New pruning job" }), errors,
    h("div", { class: "row" }, h("div", { class: "field wide" }, h("label", { for: "f-model", text: "Model" }), model)),
    h("div", { class: "row" }, field("f-method", "Method", method)),
    targetSet, calibration, evaluation, submit);
  model.id = "f-model";

  const upload = h("input", { type: "file", name: "file", accept: ".txt,.jsonl", required: true });
  const uploadErrors = h("div");
  const uploadForm = h("form", { class: "row", id: "upload-form" },
    field("f-upload", "Upload a calibration set (.txt or .jsonl)", upload),
    h("button", { type: "submit", class: "secondary", id: "upload-set", text: "Upload" }));
  const setsBody = h("tbody");
  const sets = h("section", { class: "card", id: "calibration-sets" }, h("h2", { text: "Calibration sets" }), uploadErrors, uploadForm,
    h("table", {}, h("thead", {}, h("tr", {}, ["Id", "File", "Format", "Size", "Records", "Uploaded"].map((t) => h("th", { scope: "col", text: t })))), setsBody));

  setView("New job", form, sets);

  function sync() {
    const t = form.querySelector("input[name=target]:checked").value;
    sparsity.disabled = t !== "sparsity";
    pattern.disabled = t !== "pattern";
    for (const el of [sweepRatios, sweepPatterns, sweepExport]) el.disabled = t !== "sweep";
    const c = form.querySelector("input[name=cal]:checked").value;
    calSource.disabled = c !== "named";
    calSet.disabled = c !== "set";
    calText.disabled = c !== "texts";
    evalWindows.disabled = evalSel.value === "";
  }
  form.addEventListener("change", sync);
  form.addEventListener("input", () => { idempotencyKey = randomKey(); }); // another body: another key
  sync();

  async function loadSets(select) {
    const page = await api("v1/calibration-sets?limit=100", { signal: ctl.signal });
    const opts = (blank) => [blank ? h("option", { value: "", text: blank }) : null,
      ...page.data.map((c) => h("option", { value: c.id, text: `${c.filename} (${c.records} records, ${c.id})` }))];
    const keepCal = select || calSet.value;
    const keepEval = evalSel.value;
    calSet.replaceChildren(...opts(page.data.length ? null : "no uploaded sets"));
    if (keepCal) calSet.value = keepCal;
    evalSel.replaceChildren(h("option", { value: "", text: "no evaluation" }),
      h("optgroup", { label: "Named sets" }, NAMED_SETS.map((n) => h("option", { value: `named:${n}`, text: n }))),
      h("optgroup", { label: "Uploaded sets" }, page.data.map((c) => h("option", { value: `set:${c.id}`, text: `${c.filename} (${c.id})` }))));
    evalSel.value = keepEval;
    setsBody.replaceChildren(...(page.data.length ? page.data.map((c) => h("tr", { data: { setId: c.id } },
      h("td", { class: "mono", text: c.id }), h("td", { text: c.filename }), h("td", { text: c.format }),
      h("td", { class: "num", text: bytes(c.size) }), h("td", { class: "num", text: c.records }), h("td", { text: when(c.created_at) })))
      : [h("tr", {}, h("td", { colspan: "6", class: "muted", text: "None uploaded yet." }))]));
    sync();
  }
  loadSets().catch((e) => e.name !== "AbortError" && uploadErrors.replaceChildren(problemBox(e)));

  uploadForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(uploadErrors);
    if (!upload.files.length) { upload.focus(); return; }
    const body = new FormData();
    body.append("file", upload.files[0], upload.files[0].name);
    try {
      const cs = await api("v1/calibration-sets", { method: "POST", body, signal: ctl.signal });
      upload.value = "";
      notify(`Uploaded ${cs.filename} as ${cs.id}.`);
      form.querySelector("#cal-set").checked = true;
      await loadSets(cs.id);
    } catch (e) {
      if (e.name !== "AbortError") uploadErrors.replaceChildren(problemBox(e));
    }
  });

  function body() {
    const b = { model: model.value.trim(), method: method.value };
    if (!sparsity.disabled) b.sparsity = sparsity.value === "" ? null : Number(sparsity.value);
    if (!pattern.disabled) b.pattern = pattern.value.trim();
    if (!sweepRatios.disabled) {
      // a sweep: lists as the API takes them (a word that is not a number is sent as null, and refused by name)
      const items = (input) => input.value.split(",").map((x) => x.trim()).filter((x) => x !== "");
      const number = (x) => (Number.isFinite(Number(x)) ? Number(x) : null);
      const ratios = items(sweepRatios);
      const patterns = items(sweepPatterns);
      const marked = items(sweepExport);
      if (ratios.length) b.sparsities = ratios.map(number);
      if (patterns.length) b.patterns = patterns;
      const markedPatterns = marked.filter((x) => x.includes(":"));
      const markedRatios = marked.filter((x) => !x.includes(":")).map(number);
      if (markedRatios.length) b.export_sparsities = markedRatios;
      if (markedPatterns.length) b.export_patterns = markedPatterns;
      if (!ratios.length && !patterns.length) b.sparsities = [];
    }
    const cal = { nsamples: Number(nsamples.value), seqlen: Number(seqlen.value) };
    if (!calSource.disabled) cal.source = calSource.value;
    if (!calSet.disabled) cal.calibration_set_id = calSet.value || null;
    if (!calText.disabled) cal.texts = calText.value.split(/\n\s*\n/).filter((t) => t.trim() !== "");
    b.calibration = cal;
    if (evalSel.value) {
      const [kind, ref] = evalSel.value.split(/:(.*)/s);
      const ev = kind === "named" ? { source: ref } : { calibration_set_id: ref };
      if (evalWindows.value) ev.max_windows = Number(evalWindows.value);
      b.evaluation = ev;
    }
    return b;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(errors);
    markFields(form, null);
    submit.disabled = true;
    try {
      const job = await api("v1/pruning-jobs", { method: "POST", json: body(), headers: { "Idempotency-Key": idempotencyKey }, signal: ctl.signal });
      idempotencyKey = randomKey();
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (e.name === "AbortError") return;
      errors.replaceChildren(problemBox(e));
      markFields(form, e);
    } finally {
      submit.disabled = false;
    }
  });
  disposeView = () => ctl.abort();
}

// ---------------------------------------------------------------------------------------------------------

function start() {
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.hash = "#/jobs";
    route();
  });
  window.addEventListener("hashchange", () => {
    route();
    view().focus({ preventScroll: true });
  });
  route();
}

start();
