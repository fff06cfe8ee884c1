// FastJob console: plain modern JavaScript on the admin API only (no library, no network beyond the
// server that serves it). The token lives in sessionStorage and goes out as a Bearer header, like
// any API client's: no cookie, so no CSRF surface. Every filter is in the URL's hash, so a page
// can be bookmarked and shared.

const main = document.getElementById("main");
const TOKEN_KEY = "fastjob.token";
const FINAL = new Set(["succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"]);
let me = null;

// ---- the API ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, extraHeaders = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`, ...extraHeaders };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const payload = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    const error = payload.error || { code: String(answer.status), message: answer.statusText };
    if (answer.status === 401) { sessionStorage.removeItem(TOKEN_KEY); }
    throw new ApiError(answer.status, error.code, error.message);
  }
  return payload;
}

const can = (permission, app) => me && me.permissions.includes(permission) && (me.apps === null || !app || me.apps.includes(app));

// ---- small helpers ---------------------------------------------------------------------------
const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function when(seconds) {
  if (seconds === null || seconds === undefined) return '<span class="muted">–</span>';
  const date = new Date(seconds * 1000);
  return `<time datetime="${date.toISOString()}" title="${date.toISOString()} UTC">${esc(date.toLocaleString())}</time>`;
}

const ms = (seconds) => (seconds === null || seconds === undefined ? "–" : `${(seconds * 1000).toFixed(1)} ms`);
const status = (s) => `<span class="status-${esc(s)}">${esc(s)}</span>`;

function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  return { page: path || "dashboard", params: new URLSearchParams(query || "") };
}

function go(page, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  location.hash = `#/${page}${query.toString() ? "?" + query : ""}`;
}

// A page is drawn by the latest render only: an older one still loading (the user moved on) stops
// at its next draw instead of overwriting the newer page.
class Stale extends Error {}
let current = 0;
const failure = (error) => `<p class="error" role="alert">${esc(error.code ? error.code + ": " : "")}${esc(error.message)}</p>`;

function schedule(job) {
  if (job.cron) return { words: "cron", raw: job.cron };
  if (job.interval) return { words: `every ${job.interval}s`, raw: `interval=${job.interval}` };
  if (job.delay) return { words: `${job.delay}s after each run`, raw: `delay=${job.delay}` };
  if (job.at) return { words: "once", raw: new Date(job.at * 1000).toISOString() };
  return { words: job.run_once ? "once, at once" : "on trigger", raw: "api" };
}

async function appNames() {
  const cluster = await api("GET", "/api/v1/cluster");
  return cluster.apps.map((a) => a.name);
}

async function appPicker(page, params, extra = "") {
  const apps = await appNames();
  const app = params.get("app") || apps[0] || "";
  const options = apps.map((name) => `<option ${name === app ? "selected" : ""}>${esc(name)}</option>`).join("");
  return { app, html: `<label>App <select name="app" data-page="${page}">${options}</select></label>${extra}` };
}

function bindFilters(form, page) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    go(page, Object.fromEntries(new FormData(form)));
  });
  form.querySelectorAll("select").forEach((el) => el.addEventListener("change", () => form.requestSubmit()));
}

// ---- pages -----------------------------------------------------------------------------------
async function login(message = "") {
  current += 1;  // any page still loading is stale now
  const show = (html) => { main.innerHTML = html; };
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  show(`<h1>Log in</h1>
    <form class="stack" id="login">
      <label>API token <input name="token" type="password" autocomplete="off" required autofocus></label>
      <button class="primary">Log in</button>
      <p class="error" role="alert">${esc(message)}</p>
      <p class="muted">fastjob-server prints an admin token on its first start; <code>fastjob-server token create</code> makes more.</p>
    </form>`);
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, new FormData(event.target).get("token").trim());
    await render();
  });
}

async function dashboard(params, show) {
  const picker = await appPicker("dashboard", params);
  const app = picker.app;
  const [cluster, stats, failures, workers] = await Promise.all([
    api("GET", "/api/v1/cluster"),
    app ? api("GET", `/api/v1/apps/${encodeURIComponent(app)}/stats?window=1h`) : null,
    app ? api("GET", `/api/v1/apps/${encodeURIComponent(app)}/instances?status=failed,timed_out&limit=10`) : null,
    app ? api("GET", `/api/v1/apps/${encodeURIComponent(app)}/workers`) : null,
  ]);
  const running = stats ? (stats.totals.running || 0) + (stats.totals.dispatched || 0) : 0;
  const late = stats ? stats.lateness : {};
  show(`<h1>Dashboard</h1><form class="filters" id="f">${picker.html}</form>
    ${app ? `<div class="cards">
      <div class="card"><div class="muted">Running now</div><div class="big" id="running">${running}</div></div>
      <div class="card"><div class="muted">Failures, last hour</div><div class="big">${(stats.totals.failed || 0) + (stats.totals.timed_out || 0)}</div></div>
      <div class="card"><div class="muted">Lateness p50 / p99</div><div class="big">${ms(late.p50)} / ${ms(late.p99)}</div></div>
      <div class="card"><div class="muted">Workers</div><div class="big">${workers.workers.length}</div></div>
    </div>
    <h2>Fires per minute, last hour</h2>${chart(stats)}
    <h2>Recent failures</h2>${instanceTable(failures.instances)}` : '<p class="muted">No app yet: a worker\'s first connection, or a job created here, makes one.</p>'}
    <h2>Servers</h2>${serverTable(cluster)}`);
  bindFilters(document.getElementById("f"), "dashboard");
}

function chart(stats) {
  const kinds = [["succeeded", "#1a7f37"], ["failed", "#b42318"], ["timed_out", "#b42318"], ["skipped", "#9a6700"],
    ["cancelled", "#9a6700"], ["killed", "#b42318"], ["interrupted", "#57606a"]];
  const width = 600, height = 160, slot = width / 60;
  const start = stats.since, step = stats.bucket;
  const peak = Math.max(1, ...stats.series.map((b) => kinds.reduce((n, [k]) => n + (b[k] || 0), 0)));
  const bars = stats.series.map((b) => {
    let y = height;
    const x = ((b.t - start) / step) * slot;
    return kinds.map(([k, color]) => {
      const h = ((b[k] || 0) / peak) * (height - 10);
      y -= h;
      return h > 0 ? `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${(slot - 1).toFixed(1)}" height="${h.toFixed(1)}" fill="${color}"><title>${esc(k)}: ${b[k]}</title></rect>` : "";
    }).join("");
  }).join("");
  return `<svg class="chart" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img" aria-label="fires per minute">${bars}</svg>
    <p class="legend muted"><span style="color:#1a7f37">■ succeeded</span><span style="color:#b42318">■ failed / timed out / killed</span><span style="color:#9a6700">■ skipped / cancelled</span> · peak ${peak} a minute</p>`;
}

function serverTable(cluster) {
  return `<div class="scroll"><table><thead><tr><th>Server</th><th>Heartbeat</th><th>Apps (epoch)</th><th>Load</th></tr></thead><tbody>
    ${cluster.servers.map((s) => `<tr><td>${esc(s.id)}${s.drain ? ' <span class="muted">(draining)</span>' : ""}</td>
      <td>${s.heartbeat_age.toFixed(1)} s ago</td>
      <td>${s.apps.map((a) => `${esc(a)} (${cluster.apps.find((x) => x.name === a)?.epoch ?? "?"})`).join(", ") || '<span class="muted">none</span>'}</td>
      <td>${s.load.toFixed(2)}</td></tr>`).join("")}</tbody></table></div>`;
}

async function jobs(params, show) {
  const extra = `<label>Name <input name="name" value="${esc(params.get("name") || "")}"></label>
    <label>Tag <input name="tag" value="${esc(params.get("tag") || "")}"></label>
    <label>Status <select name="enabled"><option value="">any</option>
      <option value="true" ${params.get("enabled") === "true" ? "selected" : ""}>enabled</option>
      <option value="false" ${params.get("enabled") === "false" ? "selected" : ""}>paused</option></select></label>
    <button>Filter</button>`;
  const picker = await appPicker("jobs", params, extra);
  const app = picker.app;
  const query = new URLSearchParams({ limit: "100" });
  for (const key of ["name", "tag", "enabled", "cursor"]) if (params.get(key)) query.set(key, params.get(key));
  const page = app ? await api("GET", `/api/v1/apps/${encodeURIComponent(app)}/jobs?${query}`) : { jobs: [] };
  const manage = can("manage", app), operate = can("operate", app), trigger = can("trigger", app);
  const rows = page.jobs.map((job) => {
    const s = schedule(job);
    const buttons = [
      trigger ? `<button data-act="run" data-job="${esc(job.name)}">Run now</button>` : "",
      operate ? `<button data-act="${job.enabled ? "pause" : "resume"}" data-job="${esc(job.name)}">${job.enabled ? "Pause" : "Resume"}</button>` : "",
      manage && job.origin !== "code" ? `<a href="#/job?app=${encodeURIComponent(app)}&name=${encodeURIComponent(job.name)}">Edit</a>` : "",
      manage && job.origin !== "code" ? `<button class="danger" data-act="delete" data-job="${esc(job.name)}">Delete</button>` : "",
    ].join(" ");
    return `<tr><td><a href="#/instances?app=${encodeURIComponent(app)}&job=${encodeURIComponent(job.name)}">${esc(job.name)}</a>
      ${job.origin === "code" ? '<span class="muted">(code)</span>' : ""}</td>
      <td>${esc(s.words)}<br><code class="muted">${esc(s.raw)}</code></td><td>${when(job.next_fire_at)}</td>
      <td>${outcome(job.last_day)}</td>
      <td>${job.enabled ? "enabled" : `paused <span class="muted">(${esc(job.paused_by || "")})</span>`}</td><td>${buttons}</td></tr>`;
  }).join("");
  show(`<h1>Jobs</h1><form class="filters" id="f">${picker.html}</form>
    ${manage && app ? `<p><a href="#/job?app=${encodeURIComponent(app)}">New job</a></p>` : ""}
    <p class="error" role="alert" id="msg"></p>
    ${page.jobs.length ? `<div class="scroll"><table><thead><tr><th>Job</th><th>Schedule</th><th>Next fire</th><th>Last 24 h</th><th>State</th><th></th></tr></thead><tbody>${rows}</tbody></table></div>` : '<p class="muted">No jobs.</p>'}
    ${page.next_cursor ? `<p><a href="#/jobs?app=${encodeURIComponent(app)}&cursor=${encodeURIComponent(page.next_cursor)}">Next page</a></p>` : ""}`);
  bindFilters(document.getElementById("f"), "jobs");
  main.querySelectorAll("button[data-act]").forEach((button) => button.addEventListener("click", async () => {
    const name = button.dataset.job, base = `/api/v1/apps/${encodeURIComponent(app)}/jobs/${encodeURIComponent(name)}`;
    try {
      if (button.dataset.act === "run") {
        const raw = prompt(`Run ${name} now with params (JSON, empty for none):`, "");
        if (raw === null) return;
        const fired = await api("POST", `${base}/trigger`, raw.trim() ? { params: JSON.parse(raw) } : {});
        go("instance", { id: fired.instance_id });
        return;
      }
      if (button.dataset.act === "delete" && !confirm(`Delete job ${name}?`)) return;
      await api(button.dataset.act === "delete" ? "DELETE" : "POST", button.dataset.act === "delete" ? base : `${base}/${button.dataset.act}`);
      await render();
    } catch (error) { document.getElementById("msg").textContent = `${error.code || "error"}: ${error.message}`; }
  }));
}

async function jobForm(params, show) {
  const app = params.get("app"), name = params.get("name");
  const job = name ? (await api("GET", `/api/v1/apps/${encodeURIComponent(app)}/jobs/${encodeURIComponent(name)}`)).job : null;
  const kind = job ? (job.cron ? "cron" : job.interval ? "interval" : job.delay ? "delay" : job.at ? "at" : "api") : "cron";
  const expr = job ? (job.cron || job.interval || job.delay || (job.at ? new Date(job.at * 1000).toISOString() : "")) : "";
  show(`<h1>${job ? "Edit" : "New"} job in ${esc(app)}</h1>
    <form class="stack" id="job">
      <label>Name <input name="name" required value="${esc(job?.name || "")}" ${job ? "readonly" : ""}></label>
      <label>Handler <input name="handler" value="${esc(job?.handler || "")}" placeholder="the job's name"></label>
      <label>Schedule <select name="kind">${["cron", "interval", "delay", "at", "api"].map((k) => `<option ${k === kind ? "selected" : ""}>${k}</option>`).join("")}</select></label>
      <label>Cron, seconds, or time <input name="expr" value="${esc(expr)}" placeholder="*/5 * * * * *"></label>
      <label>Time zone <input name="timezone" value="${esc(job?.timezone || "UTC")}"></label>
      <label>Retries <input name="retries" type="number" min="0" value="${job?.retries ?? 0}"></label>
      <label>Timeout (s) <input name="timeout" type="number" min="0" step="any" value="${job?.timeout ?? ""}"></label>
      <label>Overlap <select name="overlap">${["queue", "buffer_one", "skip", "allow"].map((k) => `<option ${k === (job?.overlap || "queue") ? "selected" : ""}>${k}</option>`).join("")}</select></label>
      <label>Mode <select name="mode">${["single", "broadcast"].map((k) => `<option ${k === (job?.mode || "single") ? "selected" : ""}>${k}</option>`).join("")}</select></label>
      <label>Min success (broadcast: fraction of runs) <input name="min_success" type="number" min="0" max="1" step="any" value="${job?.min_success ?? 1}"></label>
      <label>Params (JSON) <textarea name="params">${job && job.params !== null ? esc(JSON.stringify(job.params, null, 2)) : ""}</textarea></label>
      <p class="error" role="alert" id="problem"></p>
      <div><span class="muted">Next fires:</span><ol id="next"></ol></div>
      <button class="primary" id="save">Save</button>
    </form>`);
  const form = document.getElementById("job");
  const body = () => {
    const data = Object.fromEntries(new FormData(form));
    const out = { name: data.name, retries: Number(data.retries || 0), overlap: data.overlap, timezone: data.timezone || "UTC",
      mode: data.mode, min_success: Number(data.min_success || 1) };
    if (data.handler) out.handler = data.handler;
    if (data.timeout) out.timeout = Number(data.timeout);
    if (data.kind === "cron") out.cron = data.expr;
    if (data.kind === "interval") out.interval = Number(data.expr);
    if (data.kind === "delay") out.delay = Number(data.expr);
    if (data.kind === "at") out.at = data.expr;
    if (data.params.trim()) out.params = JSON.parse(data.params);
    return out;
  };
  let timer = null;
  const check = async () => {
    const problem = document.getElementById("problem"), next = document.getElementById("next");
    try {
      const preview = await api("POST", `/api/v1/apps/${encodeURIComponent(app)}/jobs/preview?next=10`, { ...body(), name: body().name || "preview" });
      problem.textContent = "";
      const zone = preview.job.timezone || "UTC";
      const inZone = (t) => { try { return new Date(t * 1000).toLocaleString(undefined, { timeZone: zone, timeZoneName: "short" }); } catch { return new Date(t * 1000).toISOString(); } };
      next.innerHTML = preview.next_fires.map((t) => `<li><time title="${new Date(t * 1000).toISOString()} UTC">${esc(inZone(t))}</time></li>`).join("");
      return true;
    } catch (error) {
      problem.textContent = error instanceof SyntaxError ? `params: ${error.message}` : error.message;
      next.innerHTML = "";
      return false;
    }
  };
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 250); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!(await check())) return;
    try {
      const saved = job
        ? await api("PATCH", `/api/v1/apps/${encodeURIComponent(app)}/jobs/${encodeURIComponent(job.name)}`, body())
        : await api("POST", `/api/v1/apps/${encodeURIComponent(app)}/jobs`, body());
      go("jobs", { app, name: saved.job.name });
    } catch (error) { document.getElementById("problem").textContent = error.message; }
  });
  if (expr) check();
}

function outcome(day) {
  if (!day || day.success_rate === null) return '<span class="muted">no runs</span>';
  const failed = (day.outcomes.failed || 0) + (day.outcomes.timed_out || 0);
  return `${Math.round(day.success_rate * 100)}% ok${failed ? ` <span class="status-failed">(${failed} failed)</span>` : ""}`;
}

function instanceTable(rows) {
  if (!rows.length) return '<p class="muted">None.</p>';
  return `<div class="scroll"><table><thead><tr><th>Id</th><th>Job</th><th>Status</th><th>Attempt</th><th>Planned</th><th>Started</th><th>Late</th><th>Took</th><th>Worker</th></tr></thead><tbody>
    ${rows.map((r) => `<tr><td><a href="#/instance?id=${r.id}">${r.id}</a></td><td>${esc(r.job)}</td><td>${status(r.status)}</td><td>${r.attempt}</td>
      <td>${when(r.planned_at)}</td><td>${when(r.started_at)}</td><td>${ms(r.lateness)}</td><td>${ms(r.duration)}</td><td>${esc(r.worker || "")}</td></tr>`).join("")}
    </tbody></table></div>`;
}

async function instances(params, show) {
  const extra = `<label>Job <input name="job" value="${esc(params.get("job") || "")}"></label>
    <label>Status <input name="status" value="${esc(params.get("status") || "")}" placeholder="failed,timed_out"></label>
    <label>Since <input name="since" type="datetime-local" value="${esc(params.get("since") || "")}"></label>
    <label>Until <input name="until" type="datetime-local" value="${esc(params.get("until") || "")}"></label>
    <button>Filter</button>`;
  const picker = await appPicker("instances", params, extra);
  const app = picker.app;
  const query = new URLSearchParams({ limit: "50" });
  for (const key of ["job", "status", "cursor"]) if (params.get(key)) query.set(key, params.get(key));
  for (const key of ["since", "until"]) if (params.get(key)) query.set(key, String(new Date(params.get(key)).getTime() / 1000));
  const page = app ? await api("GET", `/api/v1/apps/${encodeURIComponent(app)}/instances?${query}`) : { instances: [] };
  const next = new URLSearchParams(params);
  if (page.next_cursor) next.set("cursor", page.next_cursor);
  show(`<h1>Instances</h1><form class="filters" id="f">${picker.html}</form>${instanceTable(page.instances)}
    ${page.next_cursor ? `<p><a href="#/instances?${next}">Next page</a></p>` : ""}`);
  bindFilters(document.getElementById("f"), "instances");
}

async function instance(params, show) {
  const id = params.get("id");
  // one extra request tells a workflow's instance: /steps answers 400 (invalid) for any other.
  // A section that failed to load says so in its place; the rest of the page still shows.
  const [detail, flow] = await Promise.all([
    api("GET", `/api/v1/instances/${encodeURIComponent(id)}`),
    api("GET", `/api/v1/instances/${encodeURIComponent(id)}/steps`).catch((error) => (error.status === 400 ? null : { error })),
  ]);
  const row = detail.instance;
  const finished = FINAL.has(row.status);
  const cursor = params.get("cursor") || "";
  const subtasks = detail.progress
    ? await api("GET", `/api/v1/instances/${row.id}/subtasks?limit=100${cursor ? "&cursor=" + encodeURIComponent(cursor) : ""}`)
      .catch((error) => ({ error }))
    : null;
  const steps = flow && !flow.error ? flow.steps : null;
  const operate = can("operate", row.app);
  show(`<h1>Instance ${row.id} <small>${status(row.status)}</small></h1>
    <p>Job <a href="#/jobs?app=${encodeURIComponent(row.app)}&name=${encodeURIComponent(row.job || "")}">${esc(row.job)}</a> of app ${esc(row.app)},
      planned ${when(row.planned_at)}, trigger ${esc(row.trigger)}.</p>
    <p>${!finished && operate ? '<button class="danger" id="kill">Kill</button>' : ""}
      ${finished && operate ? '<button id="retry">Retry</button>' : ""}
      <span class="error" role="alert" id="msg"></span></p>
    ${row.error ? `<p class="error">${esc(row.error)}</p>` : ""}
    ${row.result !== null ? `<p>Result: <code>${esc(JSON.stringify(row.result))}</code></p>` : ""}
    ${detail.progress ? progressLine(detail.progress) : ""}
    ${flow ? (flow.error ? `<h2>Workflow</h2>${failure(flow.error)}` : workflowSection(steps, finished && operate)) : ""}
    ${subtasks ? (subtasks.error ? `<h2>Sub-tasks</h2>${failure(subtasks.error)}` : subtaskSection(row.id, subtasks, steps, cursor)) : ""}
    <h2>Attempts</h2>${instanceTable(detail.attempts)}
    <h2>Log</h2><pre class="log" id="log" aria-live="polite"></pre>`);
  const act = async (what) => {
    try {
      const answer = await api("POST", `/api/v1/instances/${row.id}/${what}`);
      if (what === "retry") go("instance", { id: answer.instance_id }); else await render();
    } catch (error) { document.getElementById("msg").textContent = `${error.code}: ${error.message}`; }
  };
  document.getElementById("kill")?.addEventListener("click", () => act("kill"));
  document.getElementById("retry")?.addEventListener("click", () => act("retry"));
  main.querySelectorAll("button[data-succeed]").forEach((button) => button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api("POST", `/api/v1/instances/${row.id}/steps/${encodeURIComponent(button.dataset.succeed)}/succeed`, { result: null });
      await render();
    } catch (error) {
      button.disabled = false;
      document.getElementById("step-msg").textContent = `${error.code}: ${error.message}`;
    }
  }));
  tail(row.id, document.getElementById("log"), finished);
}

function progressLine(p) {
  return `<p id="progress">Sub-tasks: <progress max="${esc(Math.max(1, p.items))}" value="${esc(p.done)}"></progress>
    ${esc(p.done)} of ${esc(p.items)} done${p.failed ? `, <span class="status-failed">${esc(p.failed)} failed</span>` : ""}</p>`;
}

function subtaskSection(id, page, steps, cursor) {
  // a workflow step's batch hangs off the fire itself (its parent has no "|"); its call is the step's place, from 1
  const callName = (b) => (steps && !String(b.parent).includes("|") && steps[b.call - 1] ? ` (${esc(steps[b.call - 1].name)})` : "");
  const rows = page.batches.map((b) => {
    const first = b.errors && b.errors.length ? b.errors[0] : null;
    return `<tr><td>${esc(b.call)}${callName(b)}${b.shard ? ` <span class="muted">shard ${esc(b.shard[0] + 1)} of ${esc(b.shard[1])}</span>` : ""}</td>
      <td title="items ${esc(b.start)} to ${esc(b.start + b.size - 1)}">${esc(b.start)}..${esc(b.start + b.size)}</td>
      <td>${status(b.status)}</td><td>${esc(b.worker || "")}</td><td>${esc(b.attempts)}</td>
      <td>${b.failed ? `<span class="status-failed">${esc(b.failed)}</span>` : "0"}</td>
      <td>${first ? `<span class="error" title="item ${esc(b.start + Number(first[0]))}">#${esc(b.start + Number(first[0]))}: ${esc(first[1])}</span>` : ""}</td></tr>`;
  }).join("");
  return `<h2>Sub-tasks</h2>${page.batches.length ? `<div class="scroll"><table id="subtasks"><thead><tr><th>Call</th><th>Items</th><th>Status</th><th>Worker</th><th>Attempts</th><th>Failed</th><th>First error</th></tr></thead>
    <tbody>${rows}</tbody></table></div>` : '<p class="muted">None.</p>'}
    ${cursor ? `<p><a href="#/instance?id=${encodeURIComponent(id)}">First page</a></p>` : ""}
    ${page.next_cursor ? `<p><a id="subtasks-more" href="#/instance?id=${encodeURIComponent(id)}&cursor=${encodeURIComponent(page.next_cursor)}">More</a></p>` : ""}`;
}

function workflowSection(steps, markable) {
  const rows = steps.map((s) => `<tr data-step="${esc(s.name)}"><td>${esc(s.name)}</td><td>${s.after.map(esc).join(", ") || '<span class="muted">–</span>'}</td>
    <td>${status(s.status)}</td><td>${esc(s.worker || "")}</td><td>${s.error ? `<span class="error">${esc(s.error)}</span>` : ""}</td>
    <td>${markable && s.status !== "succeeded" ? `<button data-succeed="${esc(s.name)}">Mark succeeded</button>` : ""}</td></tr>`).join("");
  return `<h2>Workflow</h2><div class="scroll">${dag(steps)}</div>
    <p class="error" role="alert" id="step-msg"></p>
    <div class="scroll"><table id="steps"><thead><tr><th>Step</th><th>After</th><th>Status</th><th>Worker</th><th>Error</th><th></th></tr></thead>
    <tbody>${rows}</tbody></table></div>`;
}

// The workflow's graph: a column per depth (the longest path from a step without upstream steps),
// steps in declaration order down each column, an arrow from each upstream step. An arrow to the
// next column bends through the gap between the columns; one that skips columns runs in a lane
// above the boxes, so that it never passes behind a box.
function dag(steps) {
  const byName = new Map(steps.map((s) => [s.name, s]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name) || !byName.has(name)) return 0;  // the server refuses cycles; never loop on one
    seen.add(name);
    const d = Math.max(-1, ...byName.get(name).after.map((u) => depthOf(u, seen))) + 1;
    depth.set(name, d);
    return d;
  };
  const columns = [];
  for (const s of steps) (columns[depthOf(s.name)] ||= []).push(s.name);
  const links = steps.flatMap((s) => s.after.filter((u) => byName.has(u)).map((u) => ({ from: u, to: s.name })));
  const skips = links.filter((l) => depth.get(l.to) - depth.get(l.from) > 1);
  const W = 170, H = 46, GAP = 60, VGAP = 18, PAD = 8, LANE = 8, LANES = Math.min(skips.length, 6);
  const top = PAD + LANES * LANE + (LANES ? PAD : 0);
  const at = new Map();
  columns.forEach((names, c) => names.forEach((name, r) => at.set(name, { x: PAD + c * (W + GAP), y: top + r * (H + VGAP) })));
  const width = PAD * 2 + columns.length * (W + GAP) - GAP;
  const height = top + PAD + Math.max(1, ...columns.map((c) => c.length)) * (H + VGAP) - VGAP;
  const short = (text, n) => (text.length > n ? text.slice(0, n - 1) + "…" : text);
  const edges = links.map((l) => {
    const from = at.get(l.from), to = at.get(l.to);
    const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x - 2, y2 = to.y + H / 2;
    const lane = skips.indexOf(l);
    let d;
    if (lane < 0) {
      d = `M${x1},${y1} C${x1 + GAP / 2},${y1} ${x2 - GAP / 2},${y2} ${x2},${y2}`;
    } else {
      const ly = PAD + (lane % LANES) * LANE + LANE / 2, q = GAP / 3;
      d = `M${x1},${y1} C${x1 + q},${y1} ${x1 + q},${ly} ${x1 + 2 * q},${ly} L${x2 - 2 * q},${ly} C${x2 - q},${ly} ${x2 - q},${y2} ${x2},${y2}`;
    }
    return `<path class="edge" data-from="${esc(l.from)}" data-to="${esc(l.to)}" d="${d}" marker-end="url(#dag-arrow)"/>`;
  }).join("");
  const boxes = steps.map((s) => {
    const { x, y } = at.get(s.name);
    const tip = `${s.name}: ${s.status}${s.error ? "\n" + s.error : ""}`;
    return `<g class="step status-${esc(s.status)}" data-step="${esc(s.name)}" data-status="${esc(s.status)}" transform="translate(${x},${y})">
      <title>${esc(tip)}</title><rect class="under" width="${W}" height="${H}" rx="6"/><rect width="${W}" height="${H}" rx="6"/>
      <text class="name" x="10" y="19">${esc(short(s.name, 20))}</text><text class="state" x="10" y="36">${esc(s.status.replace("_", " "))}</text></g>`;
  }).join("");
  return `<svg class="dag" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="the workflow's steps">
    <defs><marker id="dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
      <path d="M0,0 L10,5 L0,10 z"/></marker></defs>${edges}${boxes}</svg>`;
}

async function tail(id, pre, finished) {
  // EventSource cannot send a Bearer header: the server-sent events are read from a fetch stream
  const line = (l) => `${new Date(l.ts * 1000).toLocaleTimeString()} ${l.level} ${l.message}\n`;
  if (finished) {
    const logs = await api("GET", `/api/v1/instances/${id}/logs?limit=10000`);
    pre.textContent = logs.lines.map(line).join("") || "(no log lines)";
    return;
  }
  const answer = await fetch(`/api/v1/instances/${id}/logs?follow=1`,
    { headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` } });
  const reader = answer.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done || !pre.isConnected) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1], data = (block.match(/^data: (.*)$/m) || [])[1];
      if (event === "line") pre.textContent += line(JSON.parse(data));
      if (event === "end") { await render(); return; }
    }
  }
}

async function workers(params, show) {
  const picker = await appPicker("workers", params);
  const page = picker.app ? await api("GET", `/api/v1/apps/${encodeURIComponent(picker.app)}/workers`) : { workers: [] };
  show(`<h1>Workers</h1><form class="filters" id="f">${picker.html}</form>
    ${page.workers.length ? `<div class="scroll"><table><thead><tr><th>Worker</th><th>Address</th><th>Handlers</th><th>Tags</th><th>Running</th><th>Heartbeat</th><th>Worker-run jobs</th></tr></thead><tbody>
    ${page.workers.map((w) => `<tr><td>${esc(w.id)}${w.draining ? ' <span class="muted">(stopping)</span>' : ""}</td><td>${esc(w.address || "")}</td>
      <td>${Object.entries(w.handlers).map(([h, k]) => `${esc(h)} <span class="muted">(${esc(k)})</span>`).join(", ")}</td>
      <td>${w.tags.map(esc).join(", ")}</td><td>${w.running}</td><td>${w.heartbeat_age.toFixed(1)} s ago</td><td>${w.second_level_jobs.length}</td></tr>`).join("")}
    </tbody></table></div>` : '<p class="muted">No worker connected.</p>'}`);
  bindFilters(document.getElementById("f"), "workers");
}

async function clusterPage(_params, show) {
  const [cluster, history] = await Promise.all([api("GET", "/api/v1/cluster"), api("GET", "/api/v1/cluster/history?limit=100").catch(() => ({ changes: [] }))]);
  show(`<h1>Cluster</h1>${serverTable(cluster)}
    <h2>Apps</h2><div class="scroll"><table><thead><tr><th>App</th><th>Owner</th><th>Epoch</th><th>Since</th></tr></thead><tbody>
    ${cluster.apps.map((a) => `<tr><td>${esc(a.name)}</td><td>${esc(a.owner || "none")}</td><td>${a.epoch}</td><td>${when(a.since)}</td></tr>`).join("")}</tbody></table></div>
    <h2>Ownership changes</h2><div class="scroll"><table id="history"><thead><tr><th>When</th><th>App</th><th>From</th><th>To</th><th>Epoch</th><th>Why</th></tr></thead><tbody>
    ${history.changes.map((c) => `<tr><td>${when(c.at)}</td><td>${esc(c.app)}</td><td>${esc(c.from || "–")}</td><td>${esc(c.to || "–")}</td><td>${c.epoch}</td><td>${esc(c.reason)}</td></tr>`).join("")}</tbody></table></div>`);
}

async function audit(params, show) {
  const page = await api("GET", `/api/v1/audit?limit=100${params.get("app") ? "&app=" + encodeURIComponent(params.get("app")) : ""}`);
  show(`<h1>Audit</h1><div class="scroll"><table><thead><tr><th>When</th><th>Who</th><th>What</th><th>App</th><th>Target</th><th>Outcome</th><th>Via</th></tr></thead><tbody>
    ${page.entries.map((e) => `<tr><td>${when(e.at)}</td><td>${esc(e.actor)}</td><td>${esc(e.action)}</td><td>${esc(e.app || "")}</td><td>${esc(e.target)}</td><td>${esc(e.outcome)}</td><td>${esc(e.via)}</td></tr>`).join("")}
    </tbody></table></div>`);
}

const PAGES = { dashboard, jobs, job: jobForm, instances, instance, workers, cluster: clusterPage, audit };

async function render() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return login();
  try {
    me = await api("GET", "/api/v1/whoami");
  } catch (error) {
    return login(error.status === 401 ? "That token is unknown, revoked or expired." : error.message);
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.querySelectorAll("[data-needs]").forEach((el) => { el.hidden = !me.permissions.includes(el.dataset.needs); });
  const { page, params } = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === `#/${page === "dashboard" ? "" : page}`));
  const mine = ++current;
  const show = (html) => {
    if (mine !== current) throw new Stale();
    main.innerHTML = html;
  };
  show('<p class="muted">Loading…</p>');
  try {
    await (PAGES[page] || dashboard)(params, show);
  } catch (error) {
    if (!(error instanceof Stale) && mine === current) main.innerHTML = failure(error);
  }
}

document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); render(); });
window.addEventListener("hashchange", render);
render();
