// The stateset-hooks console: five views over the admin API (events, one
// event, dead letters, plugins, a plugin's shadow), chosen by the URL's hash. Everything a
// sender or a plugin wrote reaches the page through `text()` (a text node),
// never as HTML. The token lives in this tab's sessionStorage and goes in
// the Authorization header, never in a cookie.
"use strict";

const TOKEN_KEY = "stateset-hooks-admin-token";
const LIVE_EVERY_MS = 2000;
let liveTimer = null;

// ---- helpers ---------------------------------------------------------------

function text(value) {
  return document.createTextNode(value === null || value === undefined ? "" : String(value));
}

// el("a", {href: "#/x", class: "c"}, "child", otherNode)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : text(child));
  }
  return node;
}

function time(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function show(id, message) {
  const node = document.getElementById(id);
  node.textContent = message || "";
  node.hidden = !message;
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    login();
    throw new Error(body.error || "the admin token is needed");
  }
  if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
  return body;
}

function statusBadge(status) {
  return el("span", { class: "status status-" + status }, status);
}

function view(...children) {
  const section = document.getElementById("view");
  section.replaceChildren(...children);
}

function login() {
  stopLive();
  view();
  document.getElementById("login").hidden = false;
  document.getElementById("token").focus();
}

function stopLive() {
  if (liveTimer) clearInterval(liveTimer);
  liveTimer = null;
  show("live", "");
}

// ---- events ----------------------------------------------------------------

function filtersFromHash() {
  const query = location.hash.split("?")[1] || "";
  return new URLSearchParams(query);
}

function eventsQuery(filters, before) {
  const params = new URLSearchParams();
  for (const name of ["type", "status", "plugin", "q"]) {
    if (filters.get(name)) params.set(name, filters.get(name));
  }
  for (const name of ["since", "until"]) {
    if (filters.get(name)) params.set(name, String(Date.parse(filters.get(name) + "Z")));
  }
  if (before) params.set("before", before);
  return "/api/events?" + params.toString();
}

function eventRow(event) {
  return el(
    "tr",
    { class: "event-row" },
    el("td", {}, time(event.received_at)),
    el("td", {}, el("a", { href: "#/event/" + encodeURIComponent(event.key), class: "event-key" }, event.key)),
    el("td", {}, event.event_type),
    el(
      "td",
      {},
      event.deliveries.map((d) =>
        el("span", { class: "delivery" }, d.plugin + " ", statusBadge(d.status), d.attempts > 1 ? " ×" + d.attempts : "")
      )
    )
  );
}

async function showEvents() {
  const filters = filtersFromHash();
  const field = (name, label, attrs = {}) =>
    el("label", {}, label, " ", el("input", { name, value: filters.get(name) || "", ...attrs }));
  const statusSelect = el(
    "select",
    { name: "status" },
    ["", "pending", "failed", "succeeded", "dead"].map((s) =>
      el("option", { value: s, selected: filters.get("status") === s ? "selected" : null }, s || "any status")
    )
  );
  const form = el(
    "form",
    {
      class: "filters",
      onsubmit: (e) => {
        e.preventDefault();
        const params = new URLSearchParams();
        for (const [name, value] of new FormData(e.target)) if (value) params.set(name, value);
        location.hash = "#/events?" + params.toString();
      },
    },
    field("q", "Event id", { placeholder: "evt_…", id: "search" }),
    field("type", "Type", { placeholder: "order.created" }),
    el("label", {}, "Status ", statusSelect),
    field("plugin", "Plugin"),
    field("since", "From (UTC)", { type: "datetime-local" }),
    field("until", "To (UTC)", { type: "datetime-local" }),
    el("button", { type: "submit" }, "Filter")
  );
  const rows = el("tbody", { id: "events" });
  const more = el("button", { id: "more", hidden: true }, "Older");
  view(
    el("h1", {}, "Events"),
    form,
    el("table", {}, el("thead", {}, el("tr", {}, ["Received", "Event", "Type", "Deliveries"].map((h) => el("th", {}, h)))), rows),
    more
  );
  let next = null;
  let pagedOn = false;
  const load = async (before) => {
    const page = await api(eventsQuery(filters, before));
    const built = page.events.map(eventRow);
    if (before) rows.append(...built);
    else rows.replaceChildren(...built);
    if (!rows.children.length) rows.append(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "No events match.")));
    next = page.next;
    more.hidden = !next;
    return page;
  };
  more.addEventListener("click", () => {
    pagedOn = true;
    show("live", "paused while older events show");
    load(next).catch((e) => show("error", e.message));
  });
  await load();
  // Live: the first page again every two seconds, until someone pages on.
  show("live", "live");
  liveTimer = setInterval(() => {
    if (!pagedOn) load().catch((e) => show("error", e.message));
  }, LIVE_EVERY_MS);
}

// ---- one event -------------------------------------------------------------

async function replay(key, plugin) {
  const body = plugin ? { plugin } : {};
  const answer = await api("/api/events/" + encodeURIComponent(key) + "/replay", { method: "POST", body });
  show("notice", "Replayed " + answer.replayed + " deliver" + (answer.replayed === 1 ? "y" : "ies") + ".");
  await showEvent(key);
}

async function showEvent(key) {
  const event = await api("/api/events/" + encodeURIComponent(key));
  const deliveries = event.deliveries.map((d) =>
    el(
      "tr",
      { class: "delivery-row", "data-plugin": d.plugin },
      el("td", {}, d.plugin),
      el("td", {}, statusBadge(d.status)),
      el("td", {}, d.attempts),
      el("td", {}, d.last_failure_kind || ""),
      el("td", {}, el("pre", { class: "message" }, d.last_failure_message || "")),
      el("td", {}, d.plugin_version || ""),
      el("td", {}, time(d.created_at), el("br"), time(d.updated_at)),
      el("td", {}, el("pre", { class: "logs" }, (d.last_logs || []).join("\n"))),
      el("td", {}, el("button", { class: "replay-one", onclick: () => replay(event.key, d.plugin).catch((e) => show("error", e.message)) }, "Replay to " + d.plugin))
    )
  );
  view(
    el("h1", {}, "Event ", el("code", { id: "event-key" }, event.key)),
    el("p", {}, el("span", { id: "event-type" }, event.event_type), " · received ", time(event.received_at)),
    el("button", { id: "replay-all", onclick: () => replay(event.key).catch((e) => show("error", e.message)) }, "Replay to every plugin"),
    el("h2", {}, "Deliveries"),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Plugin", "Status", "Attempts", "Failure", "Message", "Version", "Created / updated", "Log lines (last attempt)", ""].map((h) => el("th", {}, h)))),
      el("tbody", { id: "deliveries" }, deliveries)
    ),
    el("h2", {}, "Body"),
    el("pre", { id: "body" }, event.pretty || event.body)
  );
}

// ---- dead letters ----------------------------------------------------------

async function showDlq() {
  const { deliveries } = await api("/api/dlq");
  const rows = deliveries.map((d) =>
    el(
      "tr",
      { class: "dead-row" },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: d.id, "aria-label": "select delivery " + d.id })),
      el("td", {}, d.id),
      el("td", {}, el("a", { href: "#/event/" + encodeURIComponent(d.event_key) }, d.event_key)),
      el("td", {}, d.plugin),
      el("td", {}, d.attempts),
      el("td", {}, d.last_failure_kind || ""),
      el("td", {}, el("pre", { class: "message" }, d.last_failure_message || "")),
      el("td", {}, time(d.updated_at))
    )
  );
  const replayDead = async (body) => {
    const answer = await api("/api/dlq/replay", { method: "POST", body });
    show("notice", "Replayed " + answer.replayed + " dead deliver" + (answer.replayed === 1 ? "y" : "ies") + ".");
    await showDlq();
  };
  view(
    el("h1", {}, "Dead letters"),
    el(
      "p",
      {},
      el("button", {
        id: "replay-selected",
        onclick: () => {
          const ids = [...document.querySelectorAll(".pick:checked")].map((c) => Number(c.value));
          if (!ids.length) return show("error", "Select the deliveries to replay.");
          replayDead({ ids }).catch((e) => show("error", e.message));
        },
      }, "Replay selected"),
      " ",
      el("button", { id: "replay-dead-all", onclick: () => replayDead({ all: true }).catch((e) => show("error", e.message)) }, "Replay all")
    ),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["", "Id", "Event", "Plugin", "Attempts", "Failure", "Message", "Died"].map((h) => el("th", {}, h)))),
      el("tbody", { id: "dead" }, rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No dead deliveries.")))
    )
  );
}

// ---- plugins ---------------------------------------------------------------

function counters(c) {
  const failed = Object.entries(c.failed || {}).map(([kind, n]) => kind + " " + n);
  return ["succeeded " + c.succeeded, ...failed].join(", ");
}

function limits(l) {
  if (!l) return "";
  return `fuel ${l.fuel ?? "unmetered"}, ${l.memory_mib} MiB, ${l.timeout_ms} ms`;
}

async function showPlugins() {
  const answer = await api("/api/plugins");
  const release = async (name) => {
    await api("/api/plugins/" + encodeURIComponent(name) + "/release", { method: "POST", body: {} });
    show("notice", name + " released: its held deliveries run now.");
    await showPlugins();
  };
  const rows = answer.plugins.map((p) =>
    el(
      "tr",
      { class: "plugin-row", "data-plugin": p.name },
      el("td", {}, p.name),
      el("td", {}, statusBadge(p.state)),
      el("td", {}, p.version || ""),
      el("td", {}, p.subscriptions),
      el("td", {}, limits(p.limits)),
      el("td", {}, counters(p.counters)),
      el("td", {}, el("pre", { class: "message" }, p.reason || "")),
      el(
        "td",
        {},
        p.shadow
          ? el("a", { href: "#/shadow/" + encodeURIComponent(p.name), class: "shadowing" },
              `${p.shadow.version}: ${p.shadow.runs} runs, ${p.shadow.differed} differed`)
          : ""
      ),
      el("td", {}, p.state === "quarantined" ? el("button", { class: "release", onclick: () => release(p.name).catch((e) => show("error", e.message)) }, "Release") : "")
    )
  );
  const failed = answer.failed_to_load.map((f) => el("li", {}, f.file + ": " + f.reason));
  view(
    el("h1", {}, "Plugins"),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Name", "State", "Version", "Subscriptions", "Limits", "Counters", "Last error", "Shadowing", ""].map((h) => el("th", {}, h)))),
      el("tbody", { id: "plugins" }, rows)
    ),
    failed.length ? [el("h2", {}, "Files that did not load"), el("ul", {}, failed)] : []
  );
}

// ---- a plugin's shadow -----------------------------------------------------

function outcome(error) {
  return error ? el("span", { class: "status status-failed" }, "failed") : el("span", { class: "status status-succeeded" }, "ok");
}

async function showShadow(name) {
  const answer = await api("/api/plugins/" + encodeURIComponent(name) + "/shadow");
  const c = answer.compared;
  const rows = answer.runs.map((r) =>
    el(
      "tr",
      { class: "shadow-row" + (r.live_error !== r.candidate_error ? " differs" : "") },
      el("td", {}, time(r.created_at)),
      el("td", {}, el("a", { href: "#/event/" + encodeURIComponent(r.event_key) }, r.event_key), el("br"), r.event_type),
      el("td", {}, outcome(r.live_error), " ", r.live_version, el("pre", { class: "message" }, r.live_error || "")),
      el("td", {}, outcome(r.candidate_error), " ", r.candidate_version, el("pre", { class: "message" }, r.candidate_error || "")),
      el("td", {}, `${r.live_cost.fuel} / ${r.candidate_cost.fuel}`),
      el("td", {}, `${r.live_cost.micros} / ${r.candidate_cost.micros}`),
      el("td", {}, el("pre", { class: "logs" }, r.candidate_logs.join("\n"))),
      el("td", {}, el("pre", { class: "logs" }, r.requests.map((q) => `${q.method} ${q.url} → ${q.status ?? "refused: " + q.refused}`).join("\n")))
    )
  );
  const s = answer.shadow;
  view(
    el("h1", {}, "Shadow of ", el("code", {}, name)),
    el(
      "p",
      { id: "shadow-summary" },
      s ? `Candidate ${s.version}: ${s.runs} run${s.runs === 1 ? "" : "s"} since it loaded, ${s.differed} differed, ${s.skipped} skipped. ` : "No candidate is loaded now. ",
      `Of the last ${c.runs}: ${c.same} the same, ${c.succeeded_to_failed} succeeded live but failed, ` +
        `${c.failed_to_succeeded} failed live but succeeded, ${c.error_changed} failed differently. ` +
        "It runs without effects: its requests were answered 503 by the host or refused, none sent."
    ),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Ran", "Event", "Live", "Candidate", "Fuel live / cand.", "µs live / cand.", "Candidate log lines", "Requests (not sent)"].map((h) => el("th", {}, h)))),
      el("tbody", { id: "shadow-runs" }, rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No runs yet: it runs on new events.")))
    )
  );
}

// ---- routing ---------------------------------------------------------------

async function route() {
  stopLive();
  show("error", "");
  document.getElementById("login").hidden = true;
  const hash = location.hash || "#/events";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", hash.startsWith(link.getAttribute("href")));
  }
  try {
    if (hash.startsWith("#/event/")) await showEvent(decodeURIComponent(hash.slice("#/event/".length)));
    else if (hash.startsWith("#/dlq")) await showDlq();
    else if (hash.startsWith("#/plugins")) await showPlugins();
    else if (hash.startsWith("#/shadow/")) await showShadow(decodeURIComponent(hash.slice("#/shadow/".length)));
    else await showEvents();
  } catch (error) {
    show("error", error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    route();
  });
  window.addEventListener("hashchange", () => {
    show("notice", "");
    route();
  });
  route();
});
