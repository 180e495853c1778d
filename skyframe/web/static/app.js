// skyframe dashboard: plain JavaScript, no build step, no dependencies.
//
// Everything that comes from the daemon (file, pipeline and sink names, error messages) is put
// into the page with textContent, attributes or createElement: never as HTML.
(function () {
  "use strict";

  const STATUS_INTERVAL = 2000; // polling period without EventSource
  const STALE_AFTER = 7000; // no message for this long: the stream is considered down
  const DEAD_INTERVAL = 5000; // the dead-letter list is re-read this often
  const GROUPS_INTERVAL = 5000; // the flights are re-read this often
  const SVG = "http://www.w3.org/2000/svg";
  const FEED_SIZE = 30;
  const TRANSFER_END = new Set(["delivered", "failed", "dead-lettered", "skipped"]);

  const state = {
    status: null,
    transfers: new Map(), // key -> transfer, from the last snapshot plus progress events
    feed: [],
    dead: [],
    groups: [],
    deadTotal: 0,
    deadLoaded: false,
    signedOut: false,
    es: null,
    pollTimer: null,
    reconnectTimer: null,
    lastMessage: 0,
    busy: new Set(), // actions in progress, so that a button cannot be pressed twice
  };

  // --- small helpers ------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const hasOwn = (obj, key) => obj !== null && typeof obj === "object" && Object.prototype.hasOwnProperty.call(obj, key);

  /** An element with attributes and children; strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setText(node, value) {
    const text = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  const UNITS = ["B", "KB", "MB", "GB", "TB", "PB"];

  function humanBytes(n) {
    if (typeof n !== "number" || !isFinite(n) || n < 0) return "–";
    let i = 0;
    while (n >= 1000 && i < UNITS.length - 1) {
      n /= 1000;
      i += 1;
    }
    const digits = i === 0 || n >= 100 ? 0 : n >= 10 ? 1 : 2;
    return n.toFixed(digits) + " " + UNITS[i];
  }

  const humanRate = (n) => (typeof n === "number" && isFinite(n) ? humanBytes(n) + "/s" : "–");
  const num = (n) => (typeof n === "number" && isFinite(n) ? n.toLocaleString("en") : "–");

  function clock(epoch) {
    if (typeof epoch !== "number") return "";
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function since(epoch) {
    if (typeof epoch !== "number") return "–";
    const s = Math.max(0, Date.now() / 1000 - epoch);
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  const transferKey = (t) => [t.pipeline, t.sink || "", t.relpath].join("\u0000");
  const jobKey = (j) => [j.pipeline, j.relpath].join("\u0000");

  /** Keep container's children in step with items, reusing the element of each key. */
  function reconcile(container, items, keyOf, create, update) {
    const old = new Map();
    for (const child of Array.from(container.children)) old.set(child.sfKey, child);
    const wanted = items.map((item) => {
      const key = keyOf(item);
      let node = old.get(key);
      if (node) old.delete(key);
      else {
        node = create(item);
        node.sfKey = key;
      }
      update(node, item);
      return node;
    });
    for (const node of old.values()) node.remove();
    wanted.forEach((node, i) => {
      if (container.children[i] !== node) container.insertBefore(node, container.children[i] || null);
    });
  }

  let noticeTimer = null;

  function notice(message) {
    const box = $("notice");
    setText(box, message);
    box.hidden = !message;
    clearTimeout(noticeTimer);
    if (message) noticeTimer = setTimeout(() => (box.hidden = true), 8000);
  }

  // --- API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const options = { method, credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new ApiError(0, "the daemon does not answer");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (response.status === 401 && path !== "api/login") signedOut();
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error : response.status + " " + response.statusText;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  // --- sign-in ------------------------------------------------------------------------------

  function signedOut() {
    if (state.signedOut) return;
    state.signedOut = true;
    stopLive();
    setConn("signed-out", "signed out");
    $("login").hidden = false;
    $("login-token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const input = $("login-token");
    const error = $("login-error");
    error.hidden = true;
    try {
      await api("POST", "api/login", { token: input.value });
    } catch (err) {
      setText(error, err.status === 401 ? "Wrong token." : err.message);
      error.hidden = false;
      return;
    }
    input.value = "";
    state.signedOut = false;
    $("login").hidden = true;
    connect();
    refreshDead();
  }

  // --- live updates -------------------------------------------------------------------------

  const CONN_TEXT = { live: "live", polling: "live (polling)", connecting: "connecting…", disconnected: "disconnected" };

  function setConn(kind, text) {
    const node = $("conn");
    node.dataset.state = kind;
    setText(node, text || CONN_TEXT[kind] || kind);
    document.body.classList.toggle("stale", kind === "disconnected" || kind === "signed-out");
  }

  function stopLive() {
    if (state.es) {
      state.es.close();
      state.es = null;
    }
    clearInterval(state.pollTimer);
    clearTimeout(state.reconnectTimer);
    state.pollTimer = null;
    state.reconnectTimer = null;
  }

  function connect() {
    stopLive();
    if (state.signedOut) return;
    if (typeof window.EventSource !== "function") {
      startPolling();
      return;
    }
    setConn("connecting");
    state.lastMessage = Date.now(); // the watchdog's grace period starts now
    const es = new EventSource("api/events", { withCredentials: true });
    state.es = es;
    es.addEventListener("open", () => {
      if (state.es !== es) return;
      state.lastMessage = Date.now();
      setConn("live");
    });
    es.addEventListener("status", (event) => {
      if (state.es !== es) return;
      const doc = parse(event.data);
      if (doc) {
        setConn("live");
        onStatus(doc);
      }
    });
    es.addEventListener("lifecycle", (event) => {
      if (state.es !== es) return;
      const ev = parse(event.data);
      if (ev) onLifecycle(ev);
    });
    es.addEventListener("error", () => {
      if (state.es !== es) return;
      setConn("disconnected");
      if (es.readyState === EventSource.CLOSED) {
        // The server answered something other than a stream (401, 403, 5xx...): find out what.
        es.close();
        state.es = null;
        probe();
      } // otherwise the browser reconnects by itself
    });
  }

  /** After the stream was refused: sign in on 401, else read the status and try again. */
  async function probe() {
    try {
      onStatus(await api("GET", "api/status"));
    } catch (err) {
      if (err.status === 401) return; // the sign-in form is shown
    }
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, 3000);
  }

  function startPolling() {
    const poll = async () => {
      try {
        onStatus(await api("GET", "api/status"));
        setConn("polling");
      } catch (err) {
        if (err.status !== 401) setConn("disconnected");
      }
    };
    poll();
    state.pollTimer = setInterval(poll, STATUS_INTERVAL);
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (err) {
      return null;
    }
  }

  // A stream that stays silent (a proxy holding the connection, a suspended laptop) is shown
  // as down; EventSource only notices a closed connection.
  function watchdog() {
    if (state.es && state.lastMessage && Date.now() - state.lastMessage > STALE_AFTER) {
      setConn("disconnected");
      connect();
    }
    if (state.status) setText($("uptime"), since(state.status.started_at));
  }

  function onStatus(doc) {
    if (!doc || typeof doc !== "object") return;
    state.lastMessage = Date.now();
    state.status = doc;
    state.transfers = new Map();
    for (const t of Array.isArray(doc.transfers) ? doc.transfers : []) state.transfers.set(transferKey(t), { ...t });
    // The queue counts tell when the dead-letter list changed (here or through the CLI).
    let dead = 0;
    for (const p of Array.isArray(doc.pipelines) ? doc.pipelines : []) dead += (p.queue && p.queue.dead) || 0;
    if (state.deadLoaded && dead !== state.deadTotal) refreshDeadSoon();
    render();
  }

  function onLifecycle(ev) {
    state.lastMessage = Date.now();
    if (!ev || typeof ev.kind !== "string") return;
    const key = transferKey(ev);
    if (ev.kind === "started") {
      state.transfers.set(key, {
        pipeline: ev.pipeline,
        relpath: ev.relpath,
        sink: ev.sink,
        size: ev.size,
        bytes_done: ev.bytes_done || 0,
        started_at: ev.time,
        rate: 0,
      });
    } else if (ev.kind === "progress") {
      const t = state.transfers.get(key) || { pipeline: ev.pipeline, relpath: ev.relpath, sink: ev.sink, started_at: null };
      if (typeof ev.size === "number") t.size = ev.size;
      if (typeof ev.bytes_done === "number") t.bytes_done = Math.max(ev.bytes_done, t.bytes_done || 0);
      if (typeof t.started_at === "number" && typeof ev.time === "number" && ev.time > t.started_at) {
        t.rate = t.bytes_done / (ev.time - t.started_at);
      }
      state.transfers.set(key, t);
    } else if (TRANSFER_END.has(ev.kind)) {
      if (ev.sink) state.transfers.delete(key);
      else {
        for (const [k, t] of state.transfers) {
          if (t.pipeline === ev.pipeline && t.relpath === ev.relpath) state.transfers.delete(k);
        }
      }
    }
    if (ev.kind === "dead-lettered") refreshDeadSoon();
    if (ev.kind === "delivered" || ev.kind.endsWith("-complete")) refreshGroupsSoon();
    if (ev.kind === "paused" || ev.kind === "resumed") refreshStatusSoon();
    if (ev.kind !== "progress") {
      state.feed.unshift(ev);
      state.feed.length = Math.min(state.feed.length, FEED_SIZE);
      renderFeed();
    }
    renderTransfers();
  }

  let statusSoon = null;

  function refreshStatusSoon() {
    clearTimeout(statusSoon);
    statusSoon = setTimeout(async () => {
      try {
        onStatus(await api("GET", "api/status"));
      } catch (err) {
        /* the next snapshot will do */
      }
    }, 150);
  }

  let deadSoon = null;

  function refreshDeadSoon() {
    clearTimeout(deadSoon);
    deadSoon = setTimeout(refreshDead, 250);
  }

  async function refreshDead() {
    if (state.signedOut) return;
    try {
      const data = await api("GET", "api/jobs?state=dead&limit=200");
      state.dead = Array.isArray(data && data.jobs) ? data.jobs : [];
      state.deadTotal = typeof data.total === "number" ? data.total : state.dead.length;
      state.deadLoaded = true;
      renderDead();
    } catch (err) {
      /* shown by the connection indicator; tried again shortly */
    }
  }

  let groupsSoon = null;

  function refreshGroupsSoon() {
    if (groupsSoon === null) groupsSoon = setTimeout(refreshGroups, 1000);
  }

  async function refreshGroups() {
    clearTimeout(groupsSoon);
    groupsSoon = null;
    if (state.signedOut) return;
    try {
      const data = await api("GET", "api/groups");
      state.groups = Array.isArray(data && data.groups) ? data.groups : [];
      renderGroups();
    } catch (err) {
      /* shown by the connection indicator; tried again shortly */
    }
  }

  // --- actions ------------------------------------------------------------------------------

  async function action(key, button, run) {
    if (state.busy.has(key)) return;
    state.busy.add(key);
    if (button) button.disabled = true;
    try {
      await run();
    } catch (err) {
      if (err.status !== 401) notice(err.message);
    } finally {
      state.busy.delete(key);
      if (button) button.disabled = false;
      render();
    }
  }

  function applyPause(answer) {
    if (!state.status || !answer) return;
    if (typeof answer.paused === "boolean") state.status.paused = answer.paused;
    for (const p of state.status.pipelines || []) {
      if (hasOwn(answer.pipelines, p.name)) p.paused = answer.pipelines[p.name];
    }
  }

  function togglePause(pipeline, button) {
    let paused;
    if (pipeline === undefined) paused = Boolean(state.status && state.status.paused);
    else {
      const p = findPipeline(pipeline);
      paused = Boolean(p && p.paused);
    }
    const body = pipeline === undefined ? {} : { pipeline };
    return action("pause\u0000" + (pipeline === undefined ? "" : pipeline), button, async () => {
      applyPause(await api("POST", paused ? "api/resume" : "api/pause", body));
    });
  }

  function retry(job, button) {
    return action("retry\u0000" + jobKey(job), button, async () => {
      try {
        await api("POST", "api/retry", { pipeline: job.pipeline, path: job.relpath });
      } catch (err) {
        if (err.status !== 404) throw err; // 404: no longer dead-lettered; the list is re-read
      }
      state.dead = state.dead.filter((j) => jobKey(j) !== jobKey(job));
      state.deadTotal = Math.max(0, state.deadTotal - 1);
      renderDead();
      refreshDeadSoon();
    });
  }

  function retryAll(button) {
    return action("retry-all", button, async () => {
      const answer = await api("POST", "api/retry", { all: true });
      if (answer && typeof answer.retried === "number") notice("Retried " + answer.retried + " job(s).");
      state.dead = [];
      state.deadTotal = 0;
      renderDead();
      refreshDeadSoon();
    });
  }

  function reloadConfig(button) {
    return action("reload", button, async () => {
      const answer = await api("POST", "api/reload", {});
      if (answer && typeof answer.summary === "string") notice("Config reloaded: " + answer.summary + ".");
    });
  }

  function findPipeline(name) {
    const pipelines = (state.status && state.status.pipelines) || [];
    return pipelines.find((p) => p.name === name) || null;
  }

  // --- rendering ----------------------------------------------------------------------------

  let frame = 0;

  function render() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      renderHeader();
      renderOverview();
      renderPipelines();
      renderExecutors();
      renderTransfers();
      renderErrors();
      renderDead();
      renderFeed();
    });
  }

  function renderHeader() {
    const s = state.status;
    const badge = $("daemon-state");
    const button = $("daemon-toggle");
    if (!s) return;
    const paused = Boolean(s.paused);
    badge.dataset.paused = String(paused);
    badge.className = "badge " + (paused || s.metered ? "paused" : "running");
    setText(badge, paused ? "paused" : s.metered ? "held: metered link" : "running");
    setText(button, paused ? "Resume" : "Pause");
    button.dataset.action = paused ? "resume" : "pause";
    button.classList.toggle("primary", paused);
    button.disabled = state.busy.has("pause\u0000");
    setText($("version"), s.version ? "v" + s.version : "");
  }

  function renderOverview() {
    const s = state.status;
    if (!s) return;
    const tp = s.throughput || {};
    const totals = s.totals || {};
    setText($("throughput"), humanRate(tp.bytes_per_s));
    setText($("files-rate"), typeof tp.files_per_s === "number" ? tp.files_per_s.toFixed(2) : "–");
    setText($("total-delivered"), num(totals.delivered));
    setText($("total-bytes"), humanBytes(totals.bytes));
    setText($("total-failed"), num(totals.failed));
    setText($("total-dead"), num(totals.dead_lettered));
    setText($("uptime"), since(s.started_at));
    $("uptime").title = typeof s.started_at === "number" ? new Date(s.started_at * 1000).toLocaleString() : "";
  }

  function createPipeline(p) {
    const name = el("h3", { class: "pipeline-name" });
    const badge = el("span", { class: "badge" });
    const button = el("button", { type: "button", class: "button small pipeline-toggle" });
    button.addEventListener("click", () => togglePause(node.sfName, button));
    const source = el("p", { class: "source muted" });
    const queue = el("dl", { class: "queue" });
    const counts = {};
    for (const key of ["pending", "leased", "waiting", "dead"]) {
      counts[key] = el("dd", { "data-count": key });
      queue.append(el("div", null, el("dt", { text: key }), counts[key]));
    }
    const sinks = el("ul", { class: "sinks" });
    const node = el(
      "article",
      { class: "card pipeline" },
      el("header", { class: "pipeline-head" }, name, badge, button),
      source,
      queue,
      sinks,
    );
    node.sf = { name, badge, button, source, counts, sinks };
    return node;
  }

  function updatePipeline(node, p) {
    const r = node.sf;
    const daemonPaused = Boolean(state.status && state.status.paused);
    node.sfName = p.name;
    node.dataset.pipeline = p.name;
    node.dataset.paused = String(Boolean(p.paused));
    setText(r.name, p.name);
    const label = p.paused ? "paused" : daemonPaused ? "held" : "running";
    r.badge.className = "badge " + (p.paused || daemonPaused ? "paused" : "running");
    setText(r.badge, label);
    r.badge.title = label === "held" ? "the whole daemon is paused" : "";
    setText(r.button, p.paused ? "Resume" : "Pause");
    r.button.dataset.action = p.paused ? "resume" : "pause";
    r.button.setAttribute("aria-label", (p.paused ? "Resume " : "Pause ") + p.name);
    r.button.disabled = state.busy.has("pause\u0000" + p.name);
    setText(r.source, p.source);
    r.source.title = p.source || "";
    const queue = p.queue || {};
    for (const [key, dd] of Object.entries(r.counts)) setText(dd, num(queue[key] || 0));
    r.counts.dead.parentElement.classList.toggle("alert", (queue.dead || 0) > 0);
    reconcile(r.sinks, Array.isArray(p.sinks) ? p.sinks : [], (s) => s.key, createSink, updateSink);
  }

  function createSink() {
    const name = el("span", { class: "sink-name" });
    const url = el("span", { class: "sink-url muted" });
    const health = el("span", { class: "health" });
    const figures = el("span", { class: "sink-figures muted" });
    const error = el("p", { class: "sink-error error-text" });
    const node = el("li", { class: "sink" }, el("div", { class: "sink-head" }, health, name, url), figures, error);
    node.sf = { name, url, health, figures, error };
    return node;
  }

  function updateSink(node, s) {
    const r = node.sf;
    node.dataset.sink = s.key;
    node.dataset.health = s.health || "unknown";
    // key: the sink's name (as events and transfers give it); display: its URL, no password
    setText(r.name, s.key || s.display);
    setText(r.url, s.display && s.display !== s.key ? s.display : "");
    r.url.hidden = !r.url.textContent;
    setText(r.health, s.health || "unknown");
    r.health.className = "health " + (s.health || "unknown");
    setText(
      r.figures,
      [
        num(s.in_flight || 0) + " in flight",
        num(s.delivered || 0) + " delivered",
        humanBytes(s.bytes || 0),
        num(s.failed || 0) + " failed",
      ].join(" · "),
    );
    setText(r.error, s.last_error || "");
    r.error.hidden = !s.last_error;
  }

  function renderPipelines() {
    const pipelines = (state.status && Array.isArray(state.status.pipelines) && state.status.pipelines) || [];
    reconcile($("pipelines"), pipelines, (p) => p.name, createPipeline, updatePipeline);
    $("pipelines-empty").hidden = pipelines.length > 0;
  }

  function renderExecutors() {
    const list = (state.status && Array.isArray(state.status.executors) && state.status.executors) || [];
    $("executors-section").hidden = list.length === 0;
    const box = $("executors");
    const signature = JSON.stringify(list);
    if (box.sfSignature === signature) return;
    box.sfSignature = signature;
    box.replaceChildren(
      ...list.map((x) => {
        const link = x.connected ? "connected" : "not connected";
        let text = `${x.name}: ${x.kind} ${x.address}, ${link}, ${num(x.workers)} worker(s), ` +
          `${num(x.in_flight)} call(s) in flight`;
        if (x.last_error) text += `; last error: ${x.last_error}`;
        return el("li", { class: "row" + (x.last_error ? " is-error" : ""), "data-executor": x.name, text });
      }),
    );
  }

  function createTransfer() {
    const name = el("span", { class: "transfer-name" });
    const where = el("span", { class: "transfer-where muted" });
    const bar = el("progress", { class: "bar", max: "1", value: "0" });
    const figures = el("span", { class: "transfer-figures" });
    const rate = el("span", { class: "transfer-rate muted" });
    const node = el(
      "li",
      { class: "transfer" },
      el("div", { class: "transfer-head" }, name, where),
      bar,
      el("div", { class: "transfer-foot" }, figures, rate),
    );
    node.sf = { name, where, bar, figures, rate };
    return node;
  }

  function updateTransfer(node, t) {
    const r = node.sf;
    const size = typeof t.size === "number" && t.size >= 0 ? t.size : null;
    const done = typeof t.bytes_done === "number" ? t.bytes_done : 0;
    const percent = size ? Math.min(100, (100 * done) / size) : size === 0 ? 100 : null;
    node.dataset.pipeline = t.pipeline;
    node.dataset.relpath = t.relpath;
    node.dataset.sink = t.sink || "";
    node.dataset.bytesDone = String(done);
    node.dataset.size = size === null ? "" : String(size);
    node.dataset.percent = percent === null ? "" : percent.toFixed(1);
    setText(r.name, t.relpath);
    r.name.title = t.relpath;
    setText(r.where, t.pipeline + " → " + (t.sink || "?"));
    if (size) {
      r.bar.max = size;
      r.bar.value = Math.min(done, size);
    } else if (size === 0) {
      r.bar.max = 1;
      r.bar.value = 1;
    } else r.bar.removeAttribute("value"); // indeterminate
    r.bar.setAttribute("aria-label", "progress of " + t.relpath);
    r.bar.dataset.bytesDone = String(done);
    const of = size === null ? humanBytes(done) : humanBytes(done) + " of " + humanBytes(size);
    setText(r.figures, percent === null ? of : of + " · " + Math.floor(percent) + " %");
    setText(r.rate, t.rate ? humanRate(t.rate) : "");
  }

  function renderTransfers() {
    const list = Array.from(state.transfers.values()).sort(
      (a, b) => (a.started_at || 0) - (b.started_at || 0) || String(a.relpath).localeCompare(String(b.relpath)),
    );
    reconcile($("transfers"), list, transferKey, createTransfer, updateTransfer);
    $("transfers-empty").hidden = list.length > 0;
    setText($("transfers-count"), list.length ? String(list.length) : "");
  }

  function eventLine(ev, extraClass) {
    // paused and resumed concern a whole pipeline: their relpath is empty
    const parts = ev.relpath ? [ev.pipeline, ev.sink].filter((x) => x) : [];
    const detail = ev.reason || ev.error || ev.rule || (ev.remote && ev.remote !== ev.relpath ? "→ " + ev.remote : "");
    return el(
      "li",
      { class: "event " + (extraClass || ""), "data-kind": ev.kind },
      el("span", { class: "event-time muted", text: clock(ev.time) }),
      el("span", { class: "kind kind-" + String(ev.kind).replace(/[^a-z-]/g, ""), text: ev.kind }),
      el("span", { class: "event-path", text: ev.relpath || ev.pipeline }),
      el("span", { class: "event-where muted", text: parts.join(" → ") }),
      detail ? el("span", { class: "event-detail", text: detail }) : null,
    );
  }

  function renderErrors() {
    const errors = (state.status && Array.isArray(state.status.errors) && state.status.errors) || [];
    const box = $("errors");
    const signature = JSON.stringify(errors);
    if (box.sfSignature !== signature) {
      box.sfSignature = signature;
      box.replaceChildren(...errors.map((e) => eventLine(e, "is-error")));
    }
    $("errors-empty").hidden = errors.length > 0;
  }

  function renderFeed() {
    $("feed").replaceChildren(...state.feed.map((ev) => eventLine(ev)));
    $("feed-empty").hidden = state.feed.length > 0;
  }

  function createDead(job) {
    const path = el("span", { class: "dead-path" });
    const where = el("span", { class: "muted" });
    const error = el("p", { class: "dead-error error-text" });
    const button = el("button", { type: "button", class: "button small retry" }, "Retry");
    button.addEventListener("click", () => retry(node.sfJob, button));
    const node = el(
      "li",
      { class: "dead" },
      el("div", { class: "dead-main" }, el("div", { class: "dead-head" }, path, where), error),
      button,
    );
    node.sf = { path, where, error, button };
    node.sfJob = job;
    return node;
  }

  function lastError(job) {
    const errors = Array.isArray(job.errors) ? job.errors : job.errors ? [job.errors] : [];
    const last = errors[errors.length - 1];
    if (last === undefined || last === null) return "";
    if (typeof last === "string") return last;
    return last.reason || last.error || last.message || JSON.stringify(last);
  }

  function updateDead(node, job) {
    const r = node.sf;
    node.sfJob = job;
    node.dataset.pipeline = job.pipeline;
    node.dataset.relpath = job.relpath;
    setText(r.path, job.relpath);
    r.path.title = job.relpath;
    const attempts = typeof job.attempts === "number" ? " · " + job.attempts + " attempt(s)" : "";
    setText(r.where, job.pipeline + attempts + (job.action && job.action !== "upload" ? " · " + job.action : ""));
    const error = lastError(job);
    setText(r.error, error);
    r.error.hidden = !error;
    r.button.setAttribute("aria-label", "Retry " + job.relpath);
    r.button.disabled = state.busy.has("retry\u0000" + jobKey(job));
  }

  function renderDead() {
    reconcile($("dead-list"), state.dead, jobKey, createDead, updateDead);
    const empty = $("dead-empty");
    empty.hidden = state.dead.length > 0;
    setText(empty, state.deadLoaded ? "The dead-letter list is empty." : "Loading…");
    const more = state.deadTotal > state.dead.length ? " (" + state.dead.length + " shown)" : "";
    setText($("dead-count"), state.deadTotal ? String(state.deadTotal) + more : "");
    $("retry-all").disabled = state.dead.length === 0 || state.busy.has("retry-all");
  }

  // --- flights (groups) ---------------------------------------------------------------------

  const groupKey = (g) => g.pipeline + "\u0000" + g.name + "\u0000" + g.key;

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  /** The convex hull of [x, y] points (monotone chain), for the footprint. */
  function hull(points) {
    const p = points.slice().sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    if (p.length < 3) return p;
    const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
    const lower = [];
    for (const q of p) {
      while (lower.length >= 2 && cross(lower[lower.length - 2], lower[lower.length - 1], q) <= 0) lower.pop();
      lower.push(q);
    }
    const upper = [];
    for (const q of p.reverse()) {
      while (upper.length >= 2 && cross(upper[upper.length - 2], upper[upper.length - 1], q) <= 0) upper.pop();
      upper.push(q);
    }
    return lower.slice(0, -1).concat(upper.slice(0, -1));
  }

  /** The photos' positions drawn in a small box (no map tiles): dots and the footprint. */
  function drawPositions(box, positions) {
    box.replaceChildren();
    const points = positions.filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]));
    if (!points.length) return;
    const W = 160, H = 100, PAD = 6;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
    // Longitude degrees shrink with latitude: keep the drawing's proportions true.
    const kx = Math.cos(((minY + maxY) / 2) * Math.PI / 180);
    const span = Math.max((maxX - minX) * kx, maxY - minY) || 1e-9;
    const scale = Math.min((W - 2 * PAD) / span, (H - 2 * PAD) / span);
    const at = (p) => [
      PAD + ((p[0] - minX) * kx) * scale + (W - 2 * PAD - (maxX - minX) * kx * scale) / 2,
      H - PAD - (p[1] - minY) * scale - (H - 2 * PAD - (maxY - minY) * scale) / 2,
    ];
    const outline = hull(points);
    if (outline.length >= 3) {
      box.append(svg("polygon", { class: "footprint", points: outline.map((p) => at(p).join(",")).join(" ") }));
    }
    for (const p of points) {
      const [x, y] = at(p);
      box.append(svg("circle", { class: "photo", cx: x.toFixed(1), cy: y.toFixed(1), r: 2 }));
    }
  }

  function createGroup() {
    const title = el("span", { class: "flight-key" });
    const badge = el("span", { class: "badge" });
    const counts = el("span", { class: "flight-counts" });
    const where = el("span", { class: "muted" });
    const plot = svg("svg", { class: "flight-plot", viewBox: "0 0 160 100", role: "img" });
    const node = el(
      "li",
      { class: "card flight" },
      el("div", { class: "flight-head" }, title, badge),
      el("div", { class: "flight-info" }, counts, where),
      plot,
    );
    node.sf = { title, badge, counts, where, plot };
    return node;
  }

  function updateGroup(node, g) {
    const r = node.sf;
    node.dataset.key = g.key;
    setText(r.title, g.key);
    const complete = g.state === "reported";
    setText(r.badge, complete ? (g.reports > 1 ? "complete (" + g.reports + " reports)" : "complete") : "open");
    r.badge.dataset.state = complete ? "complete" : "open";
    setText(r.counts, g.files + " of " + g.seen + " files delivered · " + humanBytes(g.bytes || 0));
    setText(r.where, g.pipeline + " · " + g.name + " · " + (g.positions || []).length + " with a position");
    r.plot.setAttribute("aria-label", "positions of the photos of " + g.key);
    const drawn = JSON.stringify(g.positions || []);
    if (r.plot.dataset.drawn !== drawn) {
      r.plot.dataset.drawn = drawn;
      drawPositions(r.plot, g.positions || []);
    }
  }

  function renderGroups() {
    reconcile($("flights"), state.groups, groupKey, createGroup, updateGroup);
    $("flights-section").hidden = state.groups.length === 0;
    setText($("flights-count"), state.groups.length ? String(state.groups.length) : "");
  }

  // --- start --------------------------------------------------------------------------------

  function start() {
    $("daemon-toggle").addEventListener("click", (event) => togglePause(undefined, event.currentTarget));
    $("retry-all").addEventListener("click", (event) => retryAll(event.currentTarget));
    $("reload-config").addEventListener("click", (event) => reloadConfig(event.currentTarget));
    $("login-form").addEventListener("submit", login);
    connect();
    refreshDead();
    setInterval(refreshDead, DEAD_INTERVAL);
    refreshGroups();
    setInterval(refreshGroups, GROUPS_INTERVAL);
    setInterval(watchdog, 1000);
    document.addEventListener("visibilitychange", () => {
      // Back on a phone's screen after a while: catch up at once.
      if (document.visibilityState === "visible" && !state.signedOut) {
        refreshDead();
        if (!state.es || state.es.readyState === EventSource.CLOSED) connect();
      }
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
