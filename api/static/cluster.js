// The inferq cluster console: polls GET /v1/cluster and drives /v1/models.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEY_STORE = "inferq.apiKey";
  const EVENTS_SHOWN = 12;

  const $ = (id) => document.getElementById(id);
  const ui = { view: null, polls: 0, sent: 0, shown: 0, timer: null, rendered: {} };

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function esc(value) {
    return String(value ?? "").replace(
      /[&<>"']/g,
      (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
    );
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(`the API is unreachable: ${err.message}`, 0);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const message =
        data && data.error && data.error.message
          ? data.error.message
          : text || response.statusText || "request failed";
      throw new ApiError(message, response.status);
    }
    return data;
  }

  function showMessage(text, kind) {
    const box = $("message");
    box.textContent = text;
    box.dataset.kind = kind;
    box.hidden = false;
  }

  // Replace a section only when what it shows changed, so buttons stay the same
  // elements between polls (and clicks are not lost to a redraw).
  function setHtml(id, html) {
    if (ui.rendered[id] === html) return;
    ui.rendered[id] = html;
    $(id).innerHTML = html;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s ago`;
    if (s < 120) return `${Math.round(s)} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  function clock(epoch) {
    if (!epoch) return "—";
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function stateBadge(state) {
    const tone =
      {
        ready: "ok",
        running: "ok",
        alive: "ok",
        starting: "warn",
        pending: "warn",
        restarting: "warn",
        stopping: "warn",
        node_down: "bad",
        down: "bad",
        crashed: "bad",
      }[state] || "";
    return `<span class="badge ${tone}">${esc(state)}</span>`;
  }

  const collator = new Intl.Collator(undefined, { numeric: true });

  // Workers in a steady order (model, node, first device), so rows do not swap places.
  function sortedWorkers(workers) {
    const key = (w) =>
      [w.model, w.node || w.host || "", (w.devices || [])[0] || "", w.assignment_id || w.replica_id || ""];
    return [...workers].sort((a, b) => {
      const ka = key(a);
      const kb = key(b);
      for (let i = 0; i < ka.length; i++) {
        const c = collator.compare(ka[i], kb[i]);
        if (c) return c;
      }
      return 0;
    });
  }

  function devices(list) {
    return list && list.length ? list.map(esc).join(", ") : "cpu";
  }

  // -- Cluster Information -----------------------------------------------------------
  function renderNodes(view) {
    if (!view.nodes.length) {
      return '<p class="empty">No node has registered. Start one with <span class="mono">inferq node</span>.</p>';
    }
    return view.nodes
      .map((node) => {
        const chips = node.devices.length
          ? node.devices
              .map((d) => {
                const holder = d.model ? esc(d.model) : "free";
                const title = d.replica_id ? `replica ${d.replica_id}` : "";
                return (
                  `<span class="chip${d.model ? " held" : ""}" data-node="${esc(node.name)}"` +
                  ` data-device="${esc(d.id)}" data-holder="${esc(d.model || "")}"` +
                  ` data-replica="${esc(d.replica_id || "")}" title="${esc(title)}">` +
                  `<b>${esc(node.device_kind || "dev")} ${esc(d.id)}</b>: ${holder}</span>`
                );
              })
              .join("")
          : '<span class="empty">no devices (CPU workers)</span>';
        const heartbeat = node.last_heartbeat ? view.time - node.last_heartbeat : null;
        return (
          `<div class="node" data-node="${esc(node.name)}" data-alive="${node.alive}">` +
          `<div class="node-head"><span class="node-name">${esc(node.name)}</span>` +
          `${stateBadge(node.alive ? "alive" : "down")}</div>` +
          `<dl class="node-facts">` +
          `<dt>Address</dt><dd class="mono">${esc(node.address || "—")}</dd>` +
          `<dt>Host</dt><dd class="mono">${esc(node.host || "—")}</dd>` +
          `<dt>Device kind</dt><dd>${esc(node.device_kind || "—")}</dd>` +
          `<dt>Heartbeat</dt><dd data-heartbeat>${age(heartbeat)}</dd>` +
          `</dl><div class="chips">${chips}</div></div>`
        );
      })
      .join("");
  }

  function renderEvents(view) {
    const events = [];
    for (const node of view.nodes) {
      for (const e of node.events || []) events.push({ ...e, node: node.name });
    }
    events.sort((a, b) => b.time - a.time);
    if (!events.length) return '<p class="empty">No events.</p>';
    const items = events
      .slice(0, EVENTS_SHOWN)
      .map(
        (e) =>
          `<li data-event="${esc(e.event)}" data-model="${esc(e.model)}"` +
          ` data-replica="${esc(e.replica_id)}" data-node="${esc(e.node)}">` +
          `<span class="when mono">${clock(e.time)}</span>${stateBadge(e.event)} ` +
          `<span class="mono">${esc(e.replica_id)}</span> on ${esc(e.node)}` +
          `${e.detail ? ` <span class="detail">· ${esc(e.detail)}</span>` : ""}</li>`,
      )
      .join("");
    return `<ul class="events">${items}</ul>`;
  }

  // -- Running Models ----------------------------------------------------------------
  function shownModels(view) {
    const showAll = $("show-all-models").checked;
    const withWorkers = new Set(view.workers.map((w) => w.model));
    return view.models.filter(
      (m) =>
        showAll || m.launched || m.replicas_alive > 0 || m.load_error || withWorkers.has(m.id),
    );
  }

  function renderModels(view) {
    const models = shownModels(view);
    if (!models.length) {
      return '<p class="empty">No model is running. Launch one below.</p>';
    }
    const body = models
      .map((m) => {
        const id = esc(m.id);
        const replicas = sortedWorkers(view.workers.filter((w) => w.model === m.id));
        const terminateModel = m.launched
          ? `<button type="button" class="danger terminate-model" data-model="${id}">Terminate</button>`
          : "";
        const head =
          `<tr class="model-row" data-model="${id}" data-alive="${m.replicas_alive}"` +
          ` data-wanted="${m.replicas_wanted}">` +
          `<td>${id}</td><td colspan="3" class="wrap meta">` +
          `<span data-kind>${esc(m.kind)}</span> · <span data-engine>${esc(m.engine)}</span>` +
          ` · <span data-source>${esc(m.source)}</span></td>` +
          `<td class="num" data-replicas>${m.replicas_alive} / ${m.replicas_wanted}</td>` +
          `<td>${terminateModel}</td></tr>`;
        const rows = replicas
          .map((w) => {
            const rid = esc(w.assignment_id || w.replica_id || "");
            const button = w.assignment_id
              ? `<button type="button" class="danger terminate-replica" data-model="${id}"` +
                ` data-replica="${rid}">Terminate</button>`
              : '<span class="empty">not node-managed</span>';
            return (
              `<tr class="replica-row" data-model="${id}" data-replica="${rid}"` +
              ` data-state="${esc(w.state)}" data-node="${esc(w.node || "")}">` +
              `<td class="mono">${rid}</td><td>${esc(w.node || w.host || "—")}</td>` +
              `<td>${devices(w.devices)}</td><td>${stateBadge(w.state)}</td>` +
              `<td class="num">${w.restarts} restart${w.restarts === 1 ? "" : "s"}</td>` +
              `<td>${button}</td></tr>`
            );
          })
          .join("");
        const failed = m.load_error
          ? `<tr class="load-error" data-model="${id}"><td colspan="6" class="wrap">` +
            `Failed to load on ${esc(m.load_error.host || "?")}: ${esc(m.load_error.reason)}` +
            "</td></tr>"
          : "";
        return `<tbody data-model="${id}">${head}${failed}${rows}</tbody>`;
      })
      .join("");
    return (
      '<div class="scroll"><table id="models-table"><thead><tr><th>Model / replica</th>' +
      '<th>Node</th><th>Devices</th><th>State</th><th class="num">Replicas</th>' +
      `<th></th></tr></thead>${body}</table></div>`
    );
  }

  // -- Workers -----------------------------------------------------------------------
  function renderWorkers(view) {
    if (!view.workers.length) return '<p class="empty">No worker is running.</p>';
    const rows = sortedWorkers(view.workers)
      .map((w) => {
        const id = esc(w.assignment_id || w.replica_id || "");
        const heartbeat = w.last_heartbeat ? view.time - w.last_heartbeat : null;
        return (
          `<tr class="worker-row" data-worker="${esc(w.replica_id || "")}" data-replica="${id}"` +
          ` data-model="${esc(w.model)}" data-state="${esc(w.state)}"` +
          ` data-tasks-done="${w.tasks_done}" data-in-flight="${w.in_flight}">` +
          `<td class="mono">${id}</td><td>${esc(w.model)}</td><td>${esc(w.node || w.host || "—")}</td>` +
          `<td class="num mono">${esc(w.pid ?? "—")}</td><td>${devices(w.devices)}</td>` +
          `<td>${stateBadge(w.state)}</td><td class="num">${w.tasks_done}</td>` +
          `<td class="num">${w.in_flight}</td><td>${age(heartbeat)}</td>` +
          `<td class="mono">${esc(w.replica_id || "—")}</td></tr>`
        );
      })
      .join("");
    return (
      '<div class="scroll"><table><thead><tr><th>Replica</th><th>Model</th><th>Node</th>' +
      '<th class="num">PID</th><th>Devices</th><th>State</th><th class="num">Tasks done</th>' +
      '<th class="num">In flight</th><th>Last heartbeat</th><th>Worker id</th></tr></thead>' +
      `<tbody>${rows}</tbody></table></div>`
    );
  }

  // -- Queues and jobs ---------------------------------------------------------------
  function renderQueues(view) {
    const shown = new Set(shownModels(view).map((m) => m.id));
    const queues = view.queues.filter((q) => shown.has(q.model) || q.depth > 0);
    if (!queues.length) return '<p class="empty">No queue of a running model.</p>';
    const rows = queues
      .map(
        (q) =>
          `<tr data-queue="${esc(q.name)}" data-model="${esc(q.model)}" data-depth="${q.depth}">` +
          `<td class="mono">${esc(q.name)}</td><td>${esc(q.model)}</td>` +
          `<td class="num">${q.depth}</td></tr>`,
      )
      .join("");
    return (
      '<table><thead><tr><th>Queue</th><th>Model</th><th class="num">Depth</th></tr></thead>' +
      `<tbody>${rows}</tbody></table>`
    );
  }

  function renderJobs(view) {
    if (!view.jobs) {
      return `<p class="empty">Jobs unavailable${view.jobs_problem ? `: ${esc(view.jobs_problem)}` : ""}.</p>`;
    }
    const chips = Object.entries(view.jobs)
      .map(([status, n]) => `<span class="chip" data-jobs="${esc(status)}">${esc(status)} <b>${n}</b></span>`)
      .join("");
    return `<div class="jobs">${chips}</div>`;
  }

  // -- charts: the API's samples of the last minutes (view.history) -----------------
  const CHARTS = [
    { metric: "queue_depth", label: "Queue depth", digits: 0 },
    { metric: "requests_per_s", label: "Requests/s", digits: 1 },
    { metric: "tokens_per_s", label: "Tokens/s", digits: 0 },
    { metric: "batch_size", label: "Batch size", digits: 1 },
    { metric: "padding_efficiency", label: "Padding efficiency", digits: 2, max: 1 },
    { metric: "replicas_alive", label: "Replicas alive / wanted", digits: 0, against: "replicas_wanted" },
  ];
  const CHART_W = 160;
  const CHART_H = 40;

  function line(samples, metric, top, cls) {
    const n = samples.length;
    const points = [];
    samples.forEach((s, i) => {
      const v = s[metric];
      if (v === null || v === undefined) return;
      const x = n > 1 ? (i / (n - 1)) * CHART_W : CHART_W;
      const y = CHART_H - 2 - (top > 0 ? (v / top) * (CHART_H - 4) : 0);
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    return points.length ? `<polyline class="${cls}" points="${points.join(" ")}"/>` : "";
  }

  function chart(samples, spec) {
    const values = samples.map((s) => s[spec.metric]).filter((v) => v !== null && v !== undefined);
    const wanted = spec.against ? samples.map((s) => s[spec.against]) : [];
    const top = spec.max ?? Math.max(1e-9, ...values, ...wanted);
    const last = values.length ? values[values.length - 1] : null;
    const shown = last === null ? "—" : last.toFixed(spec.digits);
    const goal = spec.against && samples.length ? ` / ${samples[samples.length - 1][spec.against]}` : "";
    return (
      `<figure class="chart" data-metric="${spec.metric}" data-points="${values.length}">` +
      `<figcaption>${esc(spec.label)} <b>${esc(shown + goal)}</b></figcaption>` +
      `<svg viewBox="0 0 ${CHART_W} ${CHART_H}" preserveAspectRatio="none" role="img" ` +
      `aria-label="${esc(spec.label)}">` +
      (spec.against ? line(samples, spec.against, top, "wanted") : "") +
      line(samples, spec.metric, top, "value") +
      "</svg></figure>"
    );
  }

  function renderCharts(view) {
    const history = (view.history && view.history.models) || {};
    const models = shownModels(view).filter((m) => (history[m.id] || []).length);
    if (!models.length) return '<p class="empty">No samples yet (one every few seconds).</p>';
    const minutes = Math.round(((view.history.sample_s || 5) * 120) / 60);
    return (
      `<p class="hint">Per model, the last ${minutes} minutes; newest on the right.</p>` +
      models
        .map(
          (m) =>
            `<div class="chart-row" data-model="${esc(m.id)}"><div class="chart-model">${esc(m.id)}</div>` +
            `<div class="charts">${CHARTS.map((c) => chart(history[m.id], c)).join("")}</div></div>`,
        )
        .join("")
    );
  }

  function render(view) {
    setHtml("nodes", renderNodes(view));
    setHtml("events", renderEvents(view));
    setHtml("models", renderModels(view));
    setHtml("workers", renderWorkers(view));
    setHtml("queues", renderQueues(view));
    setHtml("jobs", renderJobs(view));
    setHtml("charts", renderCharts(view));
  }

  // -- polling -----------------------------------------------------------------------
  function setStatus(state, text) {
    const status = $("poll-status");
    status.dataset.state = state;
    status.dataset.polls = String(ui.polls);
    status.textContent = text;
  }

  // One timer chain however polls are started (the timer, a launch, a terminate), and
  // an answer older than one already shown is dropped.
  async function poll() {
    clearTimeout(ui.timer);
    const seq = ++ui.sent;
    try {
      const view = await api("GET", "/v1/cluster");
      if (seq < ui.shown) return;
      ui.shown = seq;
      ui.view = view;
      ui.polls += 1;
      render(view);
      setStatus("ok", `updated ${new Date().toLocaleTimeString([], { hour12: false })}`);
    } catch (err) {
      if (seq >= ui.shown) setStatus("error", `cluster view failed: ${err.message}`);
    } finally {
      clearTimeout(ui.timer);
      ui.timer = setTimeout(poll, POLL_MS);
    }
  }

  // -- actions -----------------------------------------------------------------------
  function launchBody() {
    const value = (id) => $(id).value.trim();
    const body = { model_name: value("launch-model-name") };
    if (value("launch-uid")) body.model_uid = value("launch-uid");
    if (value("launch-type")) body.model_type = value("launch-type");
    if (value("launch-engine")) body.model_engine = value("launch-engine");
    if (value("launch-path")) body.model_path = value("launch-path");
    if (value("launch-replica")) body.replica = Number(value("launch-replica"));
    const nGpu = value("launch-n-gpu");
    if (nGpu) body.n_gpu = /^\d+$/.test(nGpu) ? Number(nGpu) : nGpu;
    const list = value("launch-devices");
    if (list) body.devices = list.split(/[\s,]+/).filter(Boolean);
    if (value("launch-node")) body.worker_ip = value("launch-node");
    return body;
  }

  async function launch(event) {
    event.preventDefault();
    const button = $("launch-button");
    const body = launchBody();
    button.disabled = true;
    showMessage(`Launching ${body.model_uid || body.model_name}…`, "info");
    try {
      // At once: the page shows the replicas coming up (the API would wait for them).
      const answer = await api("POST", "/v1/models?wait_ready=false", body);
      const placed = (answer.launched_replicas || [])
        .map((r) => `${r.replica_id} on ${r.node} [${devices(r.devices)}]`)
        .join("; ");
      showMessage(`Launched ${answer.model_uid || answer.id}: ${placed || "no new replica"}`, "ok");
      await poll();
    } catch (err) {
      showMessage(`Launch failed: ${err.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  async function terminate(model, replica) {
    const what = replica ? `replica ${replica} of ${model}` : `every replica of ${model}`;
    if (!window.confirm(`Terminate ${what}?`)) return;
    const path = replica
      ? `/v1/models/${encodeURIComponent(model)}/replicas/${encodeURIComponent(replica)}`
      : `/v1/models/${encodeURIComponent(model)}`;
    try {
      const answer = await api("DELETE", path);
      const stopped = (answer.replicas_terminated || []).join(", ") || "none";
      showMessage(`Terminated ${what} (replicas: ${stopped})`, "ok");
      await poll();
    } catch (err) {
      showMessage(`Terminate failed: ${err.message}`, "error");
    }
  }

  function onModelsClick(event) {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("terminate-replica")) {
      terminate(button.dataset.model, button.dataset.replica);
    } else if (button.classList.contains("terminate-model")) {
      terminate(button.dataset.model, null);
    }
  }

  function start() {
    try {
      $("api-key").value = window.localStorage.getItem(KEY_STORE) || "";
    } catch {
      // storage can be unavailable (private mode): the key then lasts for the page only
    }
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      try {
        window.localStorage.setItem(KEY_STORE, apiKey());
      } catch {
        // see above
      }
      showMessage(apiKey() ? "API key saved in this browser." : "API key cleared.", "info");
      poll();
    });
    $("api-key").addEventListener("change", () => {
      try {
        window.localStorage.setItem(KEY_STORE, apiKey());
      } catch {
        // see above
      }
    });
    $("show-all-models").addEventListener("change", () => ui.view && render(ui.view));
    $("launch-form").addEventListener("submit", launch);
    $("models").addEventListener("click", onModelsClick);
    poll();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
