// Berth console: plain JavaScript modules, no build step. Views: sign in, sessions, one workspace
// (terminal, files, stats), admin. Live state comes over the door's WebSocket (/ws); progress and
// stats over /console/live/<id>; files and the terminal through their own routes.
import { Terminal } from "/console/vendor/xterm/xterm.mjs";
import { FitAddon } from "/console/vendor/addon-fit/addon-fit.mjs";

const main = document.getElementById("main");
const LABELS = {
  open: "opening", queued: "queued", claiming: "materializing (warm)", materializing: "materializing", materialize_backoff: "materializing (retrying)",
  provisioning: "provisioning", provision_backoff: "provisioning (retrying)", running: "running", idle: "idle", dormant: "dormant", waking: "waking",
  stopping: "stopping", saving: "saving", sync_backoff: "saving (retrying)", removing_container: "stopping",
  removing_workspace: "stopping", stopped: "stopped", closed: "closed", failed: "failed", recovered: "recovered",
};
const OVER = new Set(["closed", "stopped", "failed", "recovered"]);
const BUSY = new Set(["open", "queued", "claiming", "materializing", "materialize_backoff", "provisioning", "provision_backoff", "waking"]);
// The idle ladder's tiers: paused (idle) wakes in milliseconds, dormant restarts its container.
const ASLEEP = new Set(["idle", "dormant"]);

// Test and debugging hooks: what this page saw, in order.
const seen = { states: {}, progress: {} };
window.berthConsole = seen;

let me = null;             // {user, roles, admin, token, expires_at, profile, profiles}
let socket = null;         // the door's WebSocket
let socketReady = null;
let requestId = 0;
const pending = new Map(); // request id → {resolve}
const sessions = new Map(); // session id → session view-model
let renderView = () => {};  // re-render the current view after a state change
let viewCleanup = () => {};

// ---------- small helpers ----------
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const short = (id) => (id || "").slice(-8);
function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0; let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}
const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;

// Errors in plain words: the first sentence, no addresses, no traces.
function plain(text) {
  if (!text) return "";
  let line = String(text).split("\n")[0];
  line = line.replace(/[a-z][a-z0-9+.-]*:\/\/\S+/gi, "a Berth service").replace(/\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b/g, "a Berth service");
  line = line.replace(/\s+at\s+\S+\.(rs|js):\d+.*/g, "");
  line = line.replace(/(^|\s)\/(?:[\w.@-]+\/)+[\w.@-]*/g, "$1a file on the host");
  if (line.length > 200) line = line.slice(0, 197) + "…";
  return line.charAt(0).toUpperCase() + line.slice(1);
}
function explain(s) {
  const d = s.detail || {};
  if (s.state === "closed") {
    if (d.code === "limit_exceeded") {
      return d.limit === "opens_per_minute" ? "Too many sessions opened in the last minute; wait a moment and try again."
        : "You already have as many sessions as you may; close one first.";
    }
    if (d.code === "queue_timeout") return "No room became free on the host in time; try again later.";
    if (d.code === "bad_request") return "This Berth does not run that profile.";
  }
  if (s.state === "failed" || d.saving_failed || (s.state === "stopping" && d.error)) {
    const reason = d.reason || s.detail?.stop_reason;
    if (/out of memory/i.test(d.error || "")) return "The workspace ran out of memory and was stopped; your files were saved.";
    if (reason === "crashed") return "The workspace stopped unexpectedly; your files were saved.";
    if (d.saving_failed) return "Saving your files failed and is being retried; nothing is removed meanwhile.";
    const text = String(d.error || s.error || "");
    if (/not ready within|health check/i.test(text)) return "The workspace did not start in time: its service never answered. Your files were saved; try opening it again.";
    if (/no space|quota|ENOSPC|disk full/i.test(text)) return "The workspace ran out of disk space (its quota); your files were saved.";
    if (/no such image|pull access|image .*not found/i.test(text)) return "The workspace image is not available on this host; tell your operator.";
    return plain(d.error || s.error) || "Something went wrong; your files were saved.";
  }
  if (d.conflicts && d.conflicts.length) return `Both versions of ${d.conflicts.length} file(s) were kept (a conflict).`;
  return "";
}

// ---------- auth ----------
async function api(path, options = {}) {
  const headers = Object.assign({ "x-berth-console": "1" }, options.headers || {});
  if (me && !path.startsWith("/console/signin")) headers.authorization = `Bearer ${me.token}`;
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  return response;
}
async function loadMe() {
  const response = await fetch("/console/me", { headers: { "x-berth-console": "1" }, credentials: "same-origin" });
  if (!response.ok) throw new Error(`the console could not load (${response.status})`);
  const body = await response.json();
  return body.signed_in ? body : null;
}
let refreshTimer = null;
function scheduleRefresh() {
  clearTimeout(refreshTimer);
  const inMs = Math.max(10_000, (me.expires_at * 1000 - Date.now()) - 120_000);
  refreshTimer = setTimeout(async () => {
    try { const fresh = await loadMe(); if (fresh) { me = fresh; scheduleRefresh(); } else location.reload(); }
    catch { scheduleRefresh(); }
  }, inMs);
}
async function signOut() {
  await fetch("/console/signout", { method: "POST", headers: { "x-berth-console": "1" }, credentials: "same-origin" });
  closeSocket(socket);
  me = null; sessions.clear(); location.hash = "#/"; location.reload();
}

function showSignIn(message) {
  document.getElementById("nav").hidden = true;
  const error = el("p", { class: "error", role: "alert", id: "signin-error" }, message || "");
  const input = el("textarea", { id: "token", rows: 4, autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "token-help" });
  const form = el("form", {
    class: "panel", onsubmit: async (event) => {
      event.preventDefault();
      error.textContent = "";
      const response = await fetch("/console/signin", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json", "x-berth-console": "1" },
        body: JSON.stringify({ token: input.value }),
      });
      if (response.ok) { start(); return; }
      const body = await response.json().catch(() => ({}));
      error.textContent = body.message || "Sign-in failed.";
    },
  },
  el("label", { for: "token" }, "Your token"),
  input,
  el("p", { id: "token-help", class: "muted" }, "Paste the token your administrator gave you. On a development machine, ",
    el("code", {}, "berth dev"), " prints a one-click sign-in link, and ", el("code", {}, "berth token --user <name>"), " prints a token."),
  error,
  el("button", { class: "primary", type: "submit", id: "signin" }, "Sign in"));
  main.replaceChildren(el("div", { class: "narrow" }, el("h1", {}, "Sign in to Berth"), form));
  input.focus();
}

// Closing a socket still connecting is reported as an error by some browsers: close it once open.
function closeSocket(ws) {
  if (!ws) return;
  ws.onmessage = null;
  ws.onclose = null;
  if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close();
  else ws.close();
}

// ---------- the door's WebSocket ----------
function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}
function setConnection(text) {
  const bar = document.getElementById("connection");
  bar.hidden = !text; bar.textContent = text || "";
}
let reconnectDelay = 500;
function connect() {
  socketReady = new Promise((resolve) => {
    const ws = new WebSocket(wsUrl("/ws"), ["berth.v1", `bearer.${me.token}`]);
    socket = ws;
    ws.onopen = () => { reconnectDelay = 500; setConnection(""); resolve(ws); };
    ws.onmessage = (event) => onFrame(JSON.parse(event.data));
    ws.onclose = async (event) => {
      for (const [, waiter] of pending) waiter.resolve({ type: "error", code: "unavailable", message: "The connection was lost; try again." });
      pending.clear();
      setConnection("Reconnecting to Berth…");
      await new Promise((r) => setTimeout(r, reconnectDelay));
      reconnectDelay = Math.min(reconnectDelay * 2, 10_000);
      try {
        const fresh = await loadMe();
        if (!fresh) { showSignIn("Your sign-in has ended; sign in again."); return; }
        me = fresh;
      } catch { /* the next attempt asks again */ }
      connect();
    };
  });
}
function request(frame) {
  const id = String(++requestId);
  return socketReady.then((ws) => new Promise((resolve) => {
    pending.set(id, { resolve });
    ws.send(JSON.stringify(Object.assign({ id }, frame)));
  }));
}
function remember(update) {
  const known = sessions.get(update.session) || { session: update.session, history: [] };
  const previousState = known.state;
  const merged = Object.assign(known, Object.fromEntries(Object.entries(update).filter(([, v]) => v !== undefined && v !== null)));
  if (update.state && (known.history.length === 0 || known.history[known.history.length - 1].state !== update.state)) {
    known.history.push({ state: update.state, at: Date.now() });
    (seen.states[update.session] ||= []).push(update.state);
  }
  if (update.state === "queued" && update.detail?.position) merged.position = update.detail.position;
  if (update.state && update.state !== "queued") delete merged.position;
  // The tier and its wake estimate stay while later notifications (warnings) replace the detail.
  if (update.detail?.tier && !update.detail?.warning) merged.ladder = update.detail;
  if (update.state && !ASLEEP.has(update.state)) delete merged.ladder;
  // A warning stands until the step it announces, a keep-alive, or work that kept the session.
  if ((update.state && update.state !== previousState) || update.detail?.kept_alive || update.detail?.working) delete merged.warning;
  if (update.detail?.warning) merged.warning = { kind: update.detail.warning, until: Date.now() + 1000 * (update.detail.in_secs || 0) };
  sessions.set(update.session, merged);
  return merged;
}
function onFrame(frame) {
  if (frame.type === "snapshot") {
    for (const record of frame.sessions || []) {
      const known = sessions.get(record.session);
      if (!known || !known.live) remember(Object.assign({}, record, { fromStore: true }));
    }
    renderView();
    return;
  }
  if (frame.type === "status") {
    const s = remember(Object.assign({}, frame, { live: true }));
    if (frame.progress) noteProgress(s.session, frame.progress);
    renderView();
    return;
  }
  if ((frame.type === "ok" || frame.type === "error") && frame.id && pending.has(frame.id)) {
    pending.get(frame.id).resolve(frame);
    pending.delete(frame.id);
  }
}
const lastActivity = new Map();
function activity(session) {
  const now = Date.now();
  if (now - (lastActivity.get(session) || 0) < 3000) return;
  lastActivity.set(session, now);
  // Input restarts the idle interval: a warning shown before it no longer holds.
  const s = sessions.get(session);
  if (s?.warning) { delete s.warning; renderView(); }
  request({ type: "activity", session });
}
async function keepWorking(session) {
  const s = sessions.get(session);
  if (s) { delete s.warning; renderView(); }
  const answer = await request({ type: "keepalive", session });
  if (answer.type === "error") alert(plain(answer.message));
}
async function wake(session) {
  lastActivity.delete(session);
  const answer = await request({ type: "activity", session });
  if (answer.type === "error") alert(plain(answer.message));
}
async function closeSession(session) {
  const answer = await request({ type: "close", session, reason: "closed from the console" });
  if (answer.type === "error") alert(plain(answer.message));
}

// ---------- live progress and stats ----------
const feeds = new Map(); // key → {ws, users}
function noteProgress(session, progress) {
  const s = sessions.get(session) || remember({ session });
  s.progress = progress;
  (seen.progress[session] ||= []).push(progress);
  for (const bar of document.querySelectorAll(`[data-progress="${session}"]`)) drawProgress(bar, s);
}
function feed(session, withStats, onStats) {
  const key = `${session}:${withStats ? 1 : 0}`;
  if (feeds.has(key)) return () => {};
  let closed = false;
  let ws = null;
  const open = () => {
    ws = new WebSocket(wsUrl(`/console/live/${session}${withStats ? "?stats=1" : ""}`), ["berth.v1", `bearer.${me.token}`]);
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "progress") noteProgress(session, frame.data);
      if (frame.type === "stats" && onStats) onStats(frame.data);
    };
    ws.onclose = () => { if (!closed) setTimeout(open, 2000); };
    feeds.set(key, ws);
  };
  open();
  return () => { closed = true; feeds.delete(key); closeSocket(ws); };
}
function drawProgress(container, s) {
  const p = s.progress || {};
  const total = p.bytes_total || 0;
  const done = p.bytes_done || 0;
  const bar = container.querySelector("progress");
  const text = container.querySelector(".progress-text");
  if (total > 0) { bar.max = total; bar.value = Math.min(done, total); }
  else if (p.files_total) { bar.max = p.files_total; bar.value = p.files_done || 0; }
  else bar.removeAttribute("value");
  text.textContent = p.files_total !== undefined
    ? `${p.files_done ?? 0} of ${p.files_total} files, ${bytes(done)} of ${bytes(total)}` : "Preparing your files…";
}

// ---------- session pieces ----------
function badge(state) {
  return el("span", { class: `badge ${state || "open"}`, "data-state": state || "open", role: "status" }, LABELS[state] || state || "opening");
}
function timings(s) {
  const at = (state) => s.history.find((h) => h.state === state)?.at;
  const start = at("open") || at("queued") || at("materializing");
  const provisioning = at("provisioning");
  const running = at("running");
  if (!start || !running) return null;
  const parts = [];
  if (at("queued") && at("materializing")) parts.push(`queued ${seconds(at("materializing") - at("queued"))}`);
  const files = at("claiming") || at("materializing");
  if (files && provisioning) parts.push(`files ${seconds(provisioning - files)}`);
  if (provisioning) parts.push(`container ${seconds(running - provisioning)}`);
  parts.push(`ready in ${seconds(running - start)}`);
  return el("div", { class: "timings" }, parts.join(" · "));
}
function sessionDetails(s) {
  const parts = [];
  if (s.state === "queued") parts.push(el("div", { class: "queue" }, s.position ? `Waiting for room on the host: number ${s.position} in the queue.` : "Waiting for room on the host."));
  if (s.state === "claiming" || s.state === "materializing" || s.state === "materialize_backoff" || (s.progress && BUSY.has(s.state))) {
    const box = el("div", { class: "progress", "data-progress": s.session },
      el("progress", { "aria-label": "Files copied into the workspace" }), el("div", { class: "progress-text muted" }));
    drawProgress(box, s);
    parts.push(box);
  }
  if (ASLEEP.has(s.state)) parts.push(el("div", { class: "muted", "data-tier": s.state }, tierText(s)));
  if (s.warning && s.warning.until > Date.now()) parts.push(el("div", { class: "warning", role: "alert", "data-warning": s.warning.kind }, warningText(s)));
  const why = explain(s);
  if (why) parts.push(el("div", { class: "error", role: "alert" }, why));
  const t = timings(s);
  if (t) parts.push(t);
  return parts;
}
function tierText(s) {
  const estimate = s.ladder?.wake_estimate_ms;
  if (s.state === "dormant") {
    const about = estimate ? `about ${seconds(estimate)}` : "a few seconds";
    return `Stopped to free its memory; your files stay on the host. Waking restarts it (${about}).`;
  }
  const about = estimate ? `about ${estimate} ms` : "well under a second";
  return `Paused: its memory is kept, so waking takes ${about}.`;
}
function warningText(s) {
  const left = Math.max(0, Math.round((s.warning.until - Date.now()) / 1000));
  const what = { pause: "pause", dormant: "stop to free its memory", close: "close (your files are saved first)" }[s.warning.kind] || s.warning.kind;
  const unless = s.warning.kind === "pause" ? " unless it is working" : "";
  return `No input: this session will ${what} in ${left} s${unless}.`;
}
function sessionActions(s, inView) {
  const over = OVER.has(s.state);
  return el("div", { class: "actions" },
    !inView && !over ? el("a", { class: "button", href: `#/s/${s.session}`, "data-action": "view" }, "Open") : null,
    ASLEEP.has(s.state) ? el("button", { type: "button", "data-action": "wake", onclick: () => wake(s.session) }, "Wake") : null,
    s.warning && s.warning.until > Date.now() && !OVER.has(s.state)
      ? el("button", { type: "button", "data-action": "keepalive", onclick: () => keepWorking(s.session) }, "Keep working") : null,
    inView && s.state === "running" ? el("button", { type: "button", "data-action": "app", onclick: () => openApp(s.session) }, "Open app ↗") : null,
    !over ? el("button", { type: "button", class: "danger", "data-action": "close", onclick: () => closeSession(s.session) }, "Close") : null,
    over && !inView && s.workspace && (!s.user || s.user === me.user)
      ? el("button", { type: "button", "data-action": "reopen", onclick: () => openWorkspace(s.workspace, me.profile) }, "Open again") : null);
}
async function openApp(session) {
  const tab = window.open("about:blank", "_blank");
  const response = await api(`/api/sessions/${session}/cookie`, { method: "POST" });
  if (!response.ok) { if (tab) tab.close(); alert("The app cannot be opened right now."); return; }
  const body = await response.json();
  if (tab) tab.location = body.path; else location.href = body.path;
}

async function openWorkspace(workspace, profile) {
  const answer = await request({ type: "open", workspace, profile });
  if (answer.type === "ok") {
    remember({ session: answer.session, workspace, user: me.user, state: sessions.get(answer.session)?.state || "open" });
    location.hash = `#/s/${answer.session}`;
    return "";
  }
  if (answer.code === "timeout") return "Berth is taking longer than usual; your session will appear below.";
  return plain(answer.message);
}

// ---------- views ----------
function setView(render, cleanup = () => {}) {
  viewCleanup();
  viewCleanup = cleanup;
  renderView = render;
  render();
}

function sessionsView() {
  document.title = "Berth: sessions";
  const releases = new Map();
  const form = el("form", { class: "panel", id: "open-form", onsubmit: async (event) => {
    event.preventDefault();
    const message = form.querySelector(".error");
    message.textContent = "";
    const button = form.querySelector("button");
    button.disabled = true;
    message.textContent = await openWorkspace(form.workspace.value.trim(), form.profile.value);
    button.disabled = false;
  } },
  el("h2", {}, "Open a workspace"),
  el("div", { class: "row" },
    el("div", {}, el("label", { for: "workspace" }, "Workspace"),
      el("input", { id: "workspace", name: "workspace", required: true, pattern: "[A-Za-z0-9_\\-][A-Za-z0-9_.\\-]{0,127}", list: "workspaces", autocomplete: "off", placeholder: "e.g. thesis" })),
    el("div", {}, el("label", { for: "profile" }, "Profile"),
      el("select", { id: "profile", name: "profile" }, (me.profiles || [me.profile]).map((p) => el("option", { value: p }, p)))),
    el("div", {}, el("button", { class: "primary", type: "submit", id: "open" }, "Open"))),
  el("datalist", { id: "workspaces" }),
  el("p", { class: "error", role: "alert" }));
  const list = el("ul", { class: "sessions", id: "sessions", "aria-live": "polite" });
  main.replaceChildren(el("h1", {}, "Your sessions"), form, list);
  const render = () => {
    const mine = [...sessions.values()].filter((s) => !s.user || s.user === me.user)
      .sort((a, b) => (b.session || "").localeCompare(a.session || ""));
    const workspaces = [...new Set(mine.map((s) => s.workspace).filter(Boolean))];
    form.querySelector("datalist").replaceChildren(...workspaces.map((w) => el("option", { value: w })));
    if (mine.length === 0) { list.replaceChildren(el("li", { class: "muted" }, "No sessions yet: open a workspace above.")); }
    else list.replaceChildren(...mine.map((s) => el("li", { class: "card", "data-session": s.session },
      el("div", { class: "card-head" }, badge(s.state), el("span", { class: "name" }, s.workspace || "workspace"),
        el("span", { class: "muted" }, `session …${short(s.session)}`)),
      sessionDetails(s), sessionActions(s, false))));
    // Progress feeds for sessions being prepared.
    for (const s of mine) {
      if (BUSY.has(s.state) && !releases.has(s.session)) releases.set(s.session, feed(s.session, false));
      if (!BUSY.has(s.state) && releases.has(s.session)) { releases.get(s.session)(); releases.delete(s.session); }
    }
  };
  setView(render, () => { for (const release of releases.values()) release(); });
}

function chart(title, floor) {
  const canvas = el("canvas", { width: 240, height: 60, role: "img", "aria-label": title });
  const value = el("div", { class: "value" }, "waiting for the first sample…");
  const points = [];
  return {
    node: el("div", { class: "chart" }, el("div", {}, el("strong", {}, title)), canvas, value),
    add(y, max, text) {
      points.push(y); if (points.length > 60) points.shift();
      value.textContent = text;
      const ctx = canvas.getContext("2d");
      const w = canvas.width; const h = canvas.height;
      ctx.clearRect(0, 0, w, h);
      ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent") || "#1f6feb";
      ctx.lineWidth = 2; ctx.beginPath();
      // Scaled to what was seen (a limit far above the samples would flatten them).
      const top = Math.max(floor, ...points) * 1.25;
      points.forEach((p, i) => {
        const x = (i / 59) * w; const yy = h - 2 - (p / top) * (h - 4);
        if (i === 0) ctx.moveTo(x, yy); else ctx.lineTo(x, yy);
      });
      ctx.stroke();
      void max;
    },
  };
}

// The workspace view opens once the session is known to be the caller's (else: not found).
function workspaceView(sessionId) {
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  setView(() => {});
  request({ type: "subscribe", session: sessionId }).then((answer) => {
    if (location.hash !== `#/s/${sessionId}`) return;
    if (answer.type === "error") {
      const missing = answer.code === "not_found" || answer.code === "bad_request";
      main.replaceChildren(el("h1", {}, missing ? "No such session" : "Cannot show this session"),
        el("p", {}, missing ? "This session is not among yours. " : `${plain(answer.message)} `, el("a", { href: "#/" }, "Back to your sessions")));
      return;
    }
    if (answer.status) remember(answer.status);
    buildWorkspaceView(sessionId);
  });
}

function buildWorkspaceView(sessionId) {
  const s0 = sessions.get(sessionId) || remember({ session: sessionId });
  document.title = `Berth: ${s0.workspace || "workspace"}`;
  const head = el("div", { class: "card-head" });
  const details = el("div", {});
  const actions = el("div", {});
  const termBox = el("div", { class: "term", id: "terminal", "aria-label": "Terminal" });
  const termNote = el("div", { class: "term-note", id: "terminal-note", "aria-live": "polite" });
  const cpu = chart("CPU", 5);
  const memory = chart("Memory", 1024 * 1024);
  const files = filesPanel(sessionId);
  main.replaceChildren(
    el("p", {}, el("a", { href: "#/" }, "← All sessions")),
    el("section", { class: "panel", "aria-label": "Session" }, head, details, actions),
    el("div", { class: "workspace" },
      el("section", { class: "panel", "aria-label": "Terminal" }, el("h2", {}, "Terminal"), termBox, termNote),
      el("div", {},
        el("section", { class: "panel", "aria-label": "Files" }, files.node),
        el("section", { class: "panel", "aria-label": "Usage" }, el("h2", {}, "Usage"), el("div", { class: "charts", id: "charts" }, cpu.node, memory.node)))));

  // The terminal: raw bytes both ways, a JSON text frame to resize.
  const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false, scrollback: 2000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(termBox);
  window.berthTerminal = term;
  let tws = null;
  let wantTerminal = true;
  const encoder = new TextEncoder();
  const sendSize = () => {
    try { fit.fit(); } catch { /* not laid out yet */ }
    if (tws && tws.readyState === WebSocket.OPEN) tws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  };
  const connectTerminal = () => {
    if (tws || !wantTerminal) return;
    termNote.textContent = "Connecting…";
    const ws = new WebSocket(wsUrl(`/api/sessions/${sessionId}/terminal`), ["berth.v1", `bearer.${me.token}`]);
    ws.binaryType = "arraybuffer";
    tws = ws;
    ws.onopen = () => { termNote.textContent = ""; sendSize(); term.focus(); };
    ws.onmessage = (event) => term.write(typeof event.data === "string" ? event.data : new Uint8Array(event.data));
    ws.onclose = (event) => {
      tws = null;
      if (!wantTerminal) return;
      const why = { 4001: "The session is idle: press any key here (or Wake) to continue.", 4002: "The session stopped.", 4003: "The session was closed.", 1000: "The shell exited; it restarts when you press a key." }[event.code];
      termNote.textContent = why || "The terminal disconnected; press a key to reconnect.";
      term.write(`\r\n\x1b[2m[${why || "disconnected"}]\x1b[0m\r\n`);
    };
  };
  term.onData((data) => {
    if (tws && tws.readyState === WebSocket.OPEN) { tws.send(encoder.encode(data)); return; }
    const s = sessions.get(sessionId);
    if (s && ASLEEP.has(s.state)) { termNote.textContent = "Waking…"; wake(sessionId); }
    else if (s && s.state === "running") connectTerminal();
  });
  const resizeObserver = new ResizeObserver(() => sendSize());
  resizeObserver.observe(termBox);

  const releaseFeed = feed(sessionId, true, (data) => {
    if (data.cpu_percent !== undefined) cpu.add(data.cpu_percent, 100, `${data.cpu_percent.toFixed(1)} % of one CPU`);
    if (data.memory_used !== undefined) memory.add(data.memory_used, data.memory_limit, `${bytes(data.memory_used)} of ${bytes(data.memory_limit)}`);
  });
  const onInput = () => activity(sessionId);
  main.addEventListener("keydown", onInput);
  main.addEventListener("pointerdown", onInput);

  let filesLoaded = false;
  const render = () => {
    const s = sessions.get(sessionId) || { session: sessionId, history: [] };
    head.replaceChildren(badge(s.state), el("span", { class: "name" }, s.workspace || "workspace"), el("span", { class: "muted" }, `session …${short(sessionId)}`));
    details.replaceChildren(...sessionDetails(s));
    actions.replaceChildren(sessionActions(s, true));
    if (s.state === "running") {
      connectTerminal();
      if (!filesLoaded) { filesLoaded = true; files.load(""); }
    } else if (ASLEEP.has(s.state) && !tws) {
      termNote.textContent = `The session is ${LABELS[s.state]}: press any key here (or Wake) to continue.`;
    } else if (OVER.has(s.state)) {
      wantTerminal = false;
      closeSocket(tws);
      tws = null;
      termNote.textContent = s.state === "failed" ? "The session failed." : `The session is ${LABELS[s.state]}.`;
    } else if (BUSY.has(s.state)) {
      termNote.textContent = "The terminal opens when the workspace is running.";
    }
  };
  setView(render, () => {
    wantTerminal = false;
    closeSocket(tws);
    tws = null;
    resizeObserver.disconnect();
    releaseFeed();
    main.removeEventListener("keydown", onInput);
    main.removeEventListener("pointerdown", onInput);
    term.dispose();
    delete window.berthTerminal;
  });
}

function filesPanel(sessionId) {
  let folder = "";
  const crumbs = el("div", { class: "crumbs", id: "crumbs" });
  const list = el("ul", { class: "files", id: "files", "aria-label": "Files" });
  const message = el("p", { class: "muted", "aria-live": "polite", id: "files-message" });
  const editor = el("div", { id: "editor", hidden: true });
  const picker = el("input", { type: "file", multiple: true, id: "upload-input", class: "visually-hidden", onchange: () => upload([...picker.files]) });
  const url = (path) => `/api/sessions/${sessionId}/files/${path.split("/").map(encodeURIComponent).join("/")}`;
  const join = (name) => (folder ? `${folder}/${name}` : name);

  async function load(path) {
    folder = path;
    const response = await api(path ? url(path) : `/api/sessions/${sessionId}/files/`);
    if (!response.ok) { message.textContent = await errorText(response); return; }
    const listing = await response.json();
    const parts = path ? path.split("/") : [];
    crumbs.replaceChildren(el("button", { type: "button", class: "link", onclick: () => load("") }, "workspace"),
      ...parts.flatMap((part, i) => ["/", el("button", { type: "button", class: "link", onclick: () => load(parts.slice(0, i + 1).join("/")) }, part)]));
    const entries = listing.entries.sort((a, b) => (a.kind === "directory" ? 0 : 1) - (b.kind === "directory" ? 0 : 1) || a.name.localeCompare(b.name));
    list.replaceChildren(...(entries.length ? entries.map((entry) => el("li", { "data-path": entry.path },
      el("button", { type: "button", class: "entry", onclick: () => (entry.kind === "directory" ? load(entry.path) : openFile(entry)) },
        entry.kind === "directory" ? `${entry.name}/` : entry.name),
      entry.kind === "file" ? el("span", { class: "size" }, bytes(entry.size)) : null,
      entry.kind === "file" ? el("button", { type: "button", class: "link", "aria-label": `Download ${entry.name}`, onclick: () => download(entry) }, "download") : null))
      : [el("li", { class: "muted" }, el("span", { class: "entry" }, "This folder is empty."))]));
    message.textContent = "";
  }
  async function errorText(response) {
    const body = await response.json().catch(() => ({}));
    if (response.status === 409) return "The files are not available in this state; wait until the session runs.";
    if (response.status === 413 || response.status === 507) return "There is not enough room in this workspace for that.";
    if (response.status >= 500) return "Berth could not do that just now (a server error); try again, or tell your operator if it keeps failing.";
    return plain(body.message) || `The files could not be read (${response.status}).`;
  }
  async function openFile(entry) {
    if (entry.size > 1024 * 1024) { message.textContent = "This file is too large to edit here; download it instead."; return; }
    const response = await api(url(entry.path));
    if (!response.ok) { message.textContent = await errorText(response); return; }
    const data = new Uint8Array(await response.arrayBuffer());
    if (data.subarray(0, 8192).includes(0)) { message.textContent = "This is not a text file; download it instead."; return; }
    const text = new TextDecoder().decode(data);
    const area = el("textarea", { id: "editor-text", rows: 14, spellcheck: "false", "aria-label": `Contents of ${entry.path}` });
    area.value = text;
    const status = el("span", { class: "muted", "aria-live": "polite", id: "editor-status" });
    editor.replaceChildren(el("h3", {}, entry.path), area, el("div", { class: "actions" },
      el("button", { type: "button", class: "primary", id: "editor-save", onclick: async () => {
        const saved = await api(url(entry.path), { method: "PUT", body: area.value, headers: { "content-type": "application/octet-stream" } });
        status.textContent = saved.ok ? "Saved." : await errorText(saved);
        if (saved.ok) load(folder);
      } }, "Save"),
      el("button", { type: "button", onclick: () => { editor.hidden = true; } }, "Close"), status));
    editor.hidden = false;
    area.addEventListener("keydown", (event) => { if ((event.ctrlKey || event.metaKey) && event.key === "s") { event.preventDefault(); editor.querySelector("#editor-save").click(); } });
    area.focus();
  }
  async function download(entry) {
    const response = await api(url(entry.path));
    if (!response.ok) { message.textContent = await errorText(response); return; }
    const blob = await response.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: entry.name });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }
  async function upload(fileList) {
    const done = [];
    const failed = [];
    for (const file of fileList) {
      message.textContent = `Uploading ${file.name}…`;
      const response = await api(url(join(file.name)), { method: "PUT", body: file, headers: { "content-type": "application/octet-stream" } });
      if (response.ok) done.push(file.name); else failed.push(`${file.name}: ${await errorText(response)}`);
    }
    await load(folder);
    message.textContent = [done.length ? `Uploaded ${done.join(", ")}.` : "", failed.length ? `Not uploaded: ${failed.join("; ")}` : ""].join(" ").trim();
  }
  async function mkdir() {
    const name = prompt("New folder name");
    if (!name) return;
    const response = await api(`${url(join(name))}?op=mkdir`, { method: "POST" });
    if (!response.ok) { message.textContent = await errorText(response); return; }
    load(folder);
  }
  const drop = el("div", { class: "drop", id: "dropzone",
    ondragover: (event) => { event.preventDefault(); drop.classList.add("over"); },
    ondragleave: () => drop.classList.remove("over"),
    ondrop: (event) => { event.preventDefault(); drop.classList.remove("over"); upload([...event.dataTransfer.files]); } },
  el("div", { class: "row" }, el("h2", {}, "Files"),
    el("button", { type: "button", onclick: () => load(folder) }, "Refresh"),
    el("button", { type: "button", onclick: () => picker.click() }, "Upload…"),
    el("button", { type: "button", onclick: mkdir }, "New folder")),
  crumbs, list, el("p", { class: "muted" }, "Drop files here to upload them into this folder."), message, picker);
  picker.hidden = true;
  return { node: el("div", {}, drop, editor), load };
}

function adminView() {
  document.title = "Berth: admin";
  if (!me.admin) { main.replaceChildren(el("h1", {}, "Admin"), el("p", {}, "The admin view needs the admin role.")); setView(() => {}); return; }
  const body = el("div", { id: "admin" }, el("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(el("h1", {}, "Admin"), body);
  let timer = null;
  const meter = (used, total, text) => el("div", {}, el("div", {}, text),
    el("div", { class: "meter", role: "meter", "aria-valuenow": used ?? 0, "aria-valuemin": 0, "aria-valuemax": total },
      el("span", { style: `width:${total ? Math.min(100, ((used ?? 0) / total) * 100) : 0}%` })));
  const load = async () => {
    const response = await api("/console/admin");
    if (!response.ok) { body.replaceChildren(el("p", { class: "error" }, "The overview cannot be loaded right now.")); return; }
    const data = await response.json();
    const c = data.capacity;
    const live = data.sessions.filter((s) => !OVER.has(s.state));
    body.replaceChildren(
      el("div", { class: "grid2" },
        el("section", { class: "panel", "aria-label": "Capacity" }, el("h2", {}, "Host capacity"),
          meter(c.memory_mib_used, c.memory_mib_total, c.memory_mib_used === null ? "Memory: unknown" : `Memory: ${c.memory_mib_used} MiB used, ${c.memory_mib_total - c.memory_mib_used} MiB free of ${c.memory_mib_total} MiB`),
          meter(c.cpu_millis_used, c.cpu_millis_total, c.cpu_millis_used === null ? "CPU: unknown" : `CPU: ${(c.cpu_millis_used / 1000).toFixed(1)} used, ${((c.cpu_millis_total - c.cpu_millis_used) / 1000).toFixed(1)} free of ${(c.cpu_millis_total / 1000).toFixed(1)} CPUs`),
          el("p", { class: "muted" }, `Each session holds ${c.per_session.memory_mib} MiB and ${c.per_session.cpus} CPU.`)),
        el("section", { class: "panel", "aria-label": "Queue" }, el("h2", {}, `Queue (${data.queue.length})`),
          data.queue.length ? el("ol", {}, data.queue.map((q) => el("li", {}, `…${short(q.thred)} waiting ${seconds(Date.now() - q.since_ms)}`))) : el("p", { class: "muted" }, "Nobody is waiting.")),
        el("section", { class: "panel", "aria-label": "Users" }, el("h2", {}, "Per user"),
          el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "user"), el("th", {}, "live"), el("th", {}, "all"))),
            el("tbody", {}, data.users.map((u) => el("tr", {}, el("td", {}, u.user), el("td", {}, u.live), el("td", {}, u.total))))))),
      el("section", { class: "panel", "aria-label": "All sessions" }, el("h2", {}, `Sessions (${live.length} live, ${data.sessions.length} in all)`),
        el("div", { class: "table-wrap" }, el("table", { id: "admin-sessions" },
          el("thead", {}, el("tr", {}, el("th", {}, "state"), el("th", {}, "user"), el("th", {}, "workspace"), el("th", {}, "session"), el("th", {}, ""))),
          el("tbody", {}, data.sessions.map((s) => el("tr", { "data-session": s.id || s.session },
            el("td", {}, badge(s.state)), el("td", {}, s.user), el("td", {}, s.workspace), el("td", {}, `…${short(s.id || s.session)}`),
            el("td", {}, OVER.has(s.state) ? "" : el("button", { type: "button", class: "danger", onclick: async () => { await closeSession(s.id || s.session); setTimeout(load, 500); } }, "Close")))))))));
  };
  load();
  timer = setInterval(load, 3000);
  setView(() => {}, () => clearInterval(timer));
}

function route() {
  if (!me) return;
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/s\/([0-9a-f-]{36})$/i);
  if (match) workspaceView(match[1]);
  else if (hash === "#/admin") adminView();
  else sessionsView();
  main.focus({ preventScroll: true });
}

async function start() {
  try { me = await loadMe(); } catch (error) { main.replaceChildren(el("p", { class: "error" }, plain(error.message))); return; }
  if (!me) { showSignIn(); return; }
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = `Signed in as ${me.user}${me.admin ? " (admin)" : ""}`;
  document.getElementById("nav-admin").hidden = !me.admin;
  scheduleRefresh();
  connect();
  route();
}
document.getElementById("signout").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
start();
