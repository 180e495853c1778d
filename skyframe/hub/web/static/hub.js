// skyframe hub: every station, today's flights, "where is this file", alerts, pause/resume.
// Plain DOM, no framework, nothing from the network but this hub. Text only through
// textContent: station, pipeline and file names are data, never markup.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key === "title" || key === "type" || key === "max" || key === "value") node.setAttribute(key, String(value));
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function size(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  function ago(epoch) {
    if (!epoch) return "never";
    const s = Math.max(0, Date.now() / 1000 - epoch);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function when(epoch) {
    return epoch ? new Date(epoch * 1000).toLocaleString() : "–";
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  class SignedOut extends Error {}

  async function api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401 && path !== "api/login") {
      signedOut();
      throw new SignedOut();
    }
    if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
    return data;
  }

  // --- sign-in: the hub sets an HttpOnly, SameSite=Strict cookie; the token is not kept here.

  function signedOut() {
    $("login").hidden = false;
    $("conn").dataset.state = "signed-out";
    $("conn").textContent = "signed out";
  }

  async function login(event) {
    event.preventDefault();
    const error = $("login-error");
    error.hidden = true;
    try {
      await api("POST", "api/login", { token: $("login-token").value });
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
      return;
    }
    $("login-token").value = "";
    $("login").hidden = true;
    refresh();
  }

  // --- stations

  async function command(station, action, pipeline) {
    try {
      const body = pipeline ? { pipeline } : {};
      const created = await api("POST", `api/stations/${encodeURIComponent(station)}/${action}`, body);
      notice(`${action} ${station}${pipeline ? " " + pipeline : ""}: sent with the station's next report (command ${created.id})`);
      refreshCommands();
    } catch (e) {
      if (!(e instanceof SignedOut)) notice(`${action} ${station}: ${e.message}`);
    }
  }

  function stationCard(s) {
    const pipelines = el("ul", { class: "pipelines" });
    for (const p of s.pipelines) {
      const q = p.queue || {};
      const down = (p.sinks || []).filter((k) => k.health === "offline" || k.health === "refused");
      pipelines.append(el("li", { class: "pipeline", "data-pipeline": p.name, "data-paused": String(p.paused) },
        el("span", {}, el("strong", {}, p.name), p.paused ? " (paused)" : "",
          el("span", { class: "muted" }, ` · ${q.pending || 0} pending · ${q.waiting || 0} waiting · ${q.dead || 0} dead`),
          down.length ? el("span", { class: "sink-down" }, ` · ${down.map((k) => `${k.key} ${k.health}`).join(", ")}`) : null),
        el("button", { type: "button", class: "button pipeline-toggle", "data-action": p.paused ? "resume" : "pause",
          onclick: () => command(s.name, p.paused ? "resume" : "pause", p.name) }, p.paused ? "Resume" : "Pause")));
    }
    const errors = el("ul", { class: "errors" });
    for (const e of s.errors || []) errors.append(el("li", {}, `${e.pipeline}: ${e.relpath}: ${e.error || e.kind}${e.reason ? " – " + e.reason : ""}`));
    const t = s.throughput || {};
    return el("article", { class: "station", "data-station": s.name, "data-state": s.state, "data-paused": String(s.paused) },
      el("header", {},
        el("h3", {}, s.name),
        el("span", { class: "badge state" }, s.revoked ? "revoked" : s.state)),
      el("p", { class: "facts" },
        `last seen ${ago(s.last_seen)} · ${size(t.bytes_per_s || 0)}/s · queue ${s.queue.pending + s.queue.leased + s.queue.waiting} · dead letters ${s.dead_letters}`,
        s.sinks_offline.length ? el("span", { class: "sink-down" }, ` · sinks down: ${s.sinks_offline.map((d) => d.sink).join(", ")}`) : null,
        s.paused ? " · paused" : ""),
      s.pipelines.length ? pipelines : el("p", { class: "empty" }, "No status yet."),
      s.errors && s.errors.length ? errors : null,
      el("div", { class: "actions" },
        el("button", { type: "button", class: "button station-pause", onclick: () => command(s.name, "pause") }, "Pause station"),
        el("button", { type: "button", class: "button station-resume", onclick: () => command(s.name, "resume") }, "Resume station")));
  }

  function showStations(stations) {
    $("stations").replaceChildren(...stations.map(stationCard));
    $("stations-empty").hidden = stations.length > 0;
    const online = stations.filter((s) => s.online).length;
    $("stations-count").textContent = stations.length ? `${online} of ${stations.length} online` : "";
  }

  // --- flights

  function showFlights(flights) {
    const body = $("flights").querySelector("tbody");
    body.replaceChildren(...flights.map((f) => el("tr", { class: "flight", "data-station": f.station, "data-name": f.name, "data-complete": String(f.complete) },
      el("td", {}, f.station), el("td", {}, f.pipeline), el("td", {}, f.name),
      el("td", {}, `${f.files_delivered} / ${f.files_seen}`), el("td", {}, size(f.bytes)),
      el("td", {}, el("progress", { max: Math.max(f.files_seen, 1), value: f.files_delivered }), f.complete ? " complete" : " in progress"))));
    $("flights").hidden = flights.length === 0;
    $("flights-empty").hidden = flights.length > 0;
    $("flights-count").textContent = flights.length ? String(flights.length) : "";
  }

  // --- alerts and commands

  function showAlerts(alerts) {
    $("alerts").replaceChildren(...alerts.map((a) => el("li", { "data-open": String(a.open), "data-kind": a.kind, "data-station": a.station },
      a.message, el("span", { class: "muted" }, a.open ? ` · since ${when(a.fired_at)}` : ` · cleared ${when(a.cleared_at)}`))));
    $("alerts-empty").hidden = alerts.length > 0;
    const open = alerts.filter((a) => a.open).length;
    $("alerts-count").textContent = open ? `${open} open` : "";
  }

  function showCommands(commands) {
    $("commands").replaceChildren(...commands.slice(0, 20).map((c) => el("li", { "data-id": c.id, "data-state": c.state, "data-station": c.station },
      `${c.action} ${c.station}${c.pipeline ? " " + c.pipeline : ""}: ${c.state}`,
      c.detail ? el("span", { class: "muted" }, ` – ${c.detail}`) : null,
      el("span", { class: "muted" }, ` · ${when(c.created_at)}`))));
    $("commands-empty").hidden = commands.length > 0;
  }

  async function refreshCommands() {
    try { showCommands((await api("GET", "api/commands")).commands); } catch (e) { /* shown by refresh */ }
  }

  // --- search

  async function search(event) {
    event.preventDefault();
    const query = $("search-input").value.trim();
    if (!query) return;
    const param = /^[0-9a-fA-F]{64}$/.test(query) ? "sha256" : "name";
    let found;
    try {
      found = (await api("GET", `api/files?${param}=${encodeURIComponent(query)}`)).files;
    } catch (e) {
      if (!(e instanceof SignedOut)) notice(`search: ${e.message}`);
      return;
    }
    const body = $("search-results").querySelector("tbody");
    body.replaceChildren(...found.map((f) => el("tr", { class: "found", "data-station": f.station, "data-sink": f.sink },
      el("td", {}, f.relpath), el("td", {}, f.station), el("td", {}, f.pipeline), el("td", {}, f.sink),
      el("td", {}, f.remote || ""), el("td", {}, size(f.size)), el("td", {}, when(f.delivered_at)))));
    $("search-results").hidden = found.length === 0;
    $("search-empty").hidden = found.length > 0;
  }

  // --- the loop

  async function refresh() {
    try {
      const today = new Date().toISOString().slice(0, 10);
      const [stations, flights, alerts, commands] = await Promise.all([
        api("GET", "api/stations"), api("GET", `api/flights?day=${today}`),
        api("GET", "api/alerts"), api("GET", "api/commands"),
      ]);
      showStations(stations.stations);
      showFlights(flights.flights);
      showAlerts(alerts.alerts);
      showCommands(commands.commands);
      $("conn").dataset.state = "live";
      $("conn").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (e instanceof SignedOut) return;
      $("conn").dataset.state = "offline";
      $("conn").textContent = `hub unreachable: ${e.message}`;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("search-form").addEventListener("submit", search);
    refresh();
    setInterval(() => { if ($("login").hidden) refresh(); }, REFRESH_MS);
  });
})();
