// openrft dashboard: curves (uPlot) of one or more runs on the same axes, growing as steps land;
// rollouts of a step with their conversations, trained tokens and trace; held-out evaluations.
"use strict";

const POLL_MS = 1500;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
// [chart id, title, metric keys (a key ending in "/" takes every metric under it), keys when runs are compared]
const CHARTS = [
  ["reward", "Reward (mean)", ["reward/mean"]],
  ["pass_rate", "Pass rate", ["pass_rate"]],
  ["kl", "KL to the base model", ["kl"]],
  ["loss", "Loss", ["loss"]],
  ["timings", "Step timings (s)", ["time/"], ["time/step"]],
  ["failures", "Failures by kind", ["failures/"]],
  ["tools", "Tool calls per rollout", ["tools/"]],
  ["throughput", "Tokens per second", ["tokens_per_s"]],
];

const state = { runs: [], selected: [], metrics: {}, charts: {}, step: null, rollouts: [], openRollout: null };

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v ?? "");

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: ${res.status}`);
  return res.json();
}

// --- runs -------------------------------------------------------------------------------------

async function loadRuns() {
  const runs = await getJSON("/api/runs");
  const known = new Set(state.runs.map((r) => r.id));
  state.runs = runs;
  if (!state.selected.length && runs.length) state.selected = [runs[runs.length - 1].id];
  if (runs.some((r) => !known.has(r.id))) drawRunPicker();
}

function drawRunPicker() {
  $("#runs").innerHTML = state.runs.map((r, i) =>
    `<label><input type="checkbox" value="${esc(r.id)}" ${state.selected.includes(r.id) ? "checked" : ""}>` +
    `<span style="color:${COLORS[i % COLORS.length]}">■</span> ${esc(r.id === "." ? r.name : r.id)}</label>`).join("");
  $("#runs").querySelectorAll("input").forEach((box) => box.addEventListener("change", () => {
    state.selected = [...$("#runs").querySelectorAll("input:checked")].map((b) => b.value);
    rebuildCharts();
    refreshPrimary(true);
  }));
}

const runColor = (id) => COLORS[Math.max(0, state.runs.findIndex((r) => r.id === id)) % COLORS.length];
const primary = () => state.selected[0];

// --- curves -----------------------------------------------------------------------------------

async function pollMetrics() {
  let grew = false;
  for (const run of state.selected) {
    const rows = (state.metrics[run] ||= []);
    const got = await getJSON(`/api/metrics?run=${encodeURIComponent(run)}&since=${rows.length}`);
    if (got.total < rows.length) { rows.length = 0; rows.push(...(await getJSON(`/api/metrics?run=${encodeURIComponent(run)}`)).rows); grew = true; }
    else if (got.rows.length) { rows.push(...got.rows); grew = true; }
  }
  return grew;
}

function keysFor(spec) {
  const keys = new Set();
  for (const run of state.selected) for (const row of state.metrics[run] || []) for (const k of Object.keys(row)) {
    if (spec.some((s) => (s.endsWith("/") ? k.startsWith(s) : k === s))) keys.add(k);
  }
  return [...keys].sort();
}

function chartData(keys) {
  const steps = new Set();
  for (const run of state.selected) for (const row of state.metrics[run] || []) steps.add(row.step);
  const xs = [...steps].sort((a, b) => a - b);
  const series = [];
  const data = [xs];
  for (const run of state.selected) {
    const byStep = new Map((state.metrics[run] || []).map((r) => [r.step, r]));
    for (const key of keys) {
      series.push({ run, key });
      data.push(xs.map((x) => { const v = byStep.get(x)?.[key]; return typeof v === "number" ? v : null; }));
    }
  }
  return { data, series };
}

function drawChart(id, title, spec, compareSpec) {
  const keys = keysFor(state.selected.length > 1 && compareSpec ? compareSpec : spec);
  const box = document.getElementById(`chart-${id}`);
  const { data, series } = chartData(keys);
  const points = series.length ? data[1].filter((v) => v !== null).length : 0;
  const signature = series.map((s) => `${s.run}|${s.key}`).join(",");
  const existing = state.charts[id];
  if (existing && existing.signature === signature) {
    existing.plot.setData(data);
  } else {
    if (existing) existing.plot.destroy();
    box.querySelector(".plot").innerHTML = "";
    box.hidden = !keys.length;  // a metric this run does not record (e.g. no tool calls, no failures)
    if (!keys.length) { delete state.charts[id]; box.dataset.points = "0"; return; }
    const dashes = [[], [6, 3], [2, 3], [8, 3, 2, 3]];
    const opts = {
      width: 330, height: 180, legend: { show: true, live: false },
      scales: { x: { time: false }, y: { range: (u, min, max) => (min === max ? [min - 0.5, max + 0.5] : uPlot.rangeNum(min, max, 0.1, true)) } },
      axes: [{ label: "step" }, { size: 56, values: (u, ticks) => ticks.map(tick) }],
      series: [{ label: "step" }, ...series.map((s, i) => ({
        label: (state.selected.length > 1 ? `${s.run}: ` : "") + s.key, spanGaps: true, width: 1.6,
        stroke: keys.length > 1 ? COLORS[(i % keys.length) % COLORS.length] : runColor(s.run),
        dash: keys.length > 1 ? dashes[state.selected.indexOf(s.run) % dashes.length] : [],
        points: { show: data[0].length < 60, size: 4 },
      }))],
    };
    state.charts[id] = { signature, plot: new uPlot(opts, data, box.querySelector(".plot")) };
  }
  box.dataset.points = String(points);
  box.dataset.series = String(series.length);
}

function tick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(1) : String(+v.toPrecision(3));
}

function rebuildCharts() {
  for (const c of Object.values(state.charts)) c.plot.destroy();
  state.charts = {};
  $("#charts").innerHTML = CHARTS.map(([id, title]) =>
    `<div class="chart" id="chart-${id}" data-points="0"><h3>${esc(title)}</h3><div class="plot"></div></div>`).join("");
  drawCharts();
}

function drawCharts() {
  for (const [id, title, spec, compareSpec] of CHARTS) drawChart(id, title, spec, compareSpec);
}

// --- evaluations --------------------------------------------------------------------------------

function flat(obj, prefix = "") {
  return Object.entries(obj).flatMap(([k, v]) =>
    v && typeof v === "object" && !Array.isArray(v) ? flat(v, `${prefix}${k}.`)
      : typeof v === "number" || typeof v === "string" ? [[prefix + k, v]] : []);
}

async function drawEvals() {
  const evals = primary() ? await getJSON(`/api/evals?run=${encodeURIComponent(primary())}`) : [];
  $("#evals-section").hidden = !evals.length;
  $("#evals").innerHTML = evals.map((e) => `<h3>${esc(e.name)}</h3><table class="kv">` +
    flat(e.data).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(fmt(v))}</td></tr>`).join("") + "</table>").join("");
}

// --- rollouts -----------------------------------------------------------------------------------

async function refreshSteps() {
  const run = primary();
  if (!run) return;
  const steps = await getJSON(`/api/steps?run=${encodeURIComponent(run)}`);
  const select = $("#step");
  const had = [...select.options].map((o) => Number(o.value));
  if (steps.length === had.length && steps.every((s, i) => s === had[i])) return;
  const follow = state.step === null || state.step === had[had.length - 1];  // on the newest step: keep following
  select.innerHTML = steps.map((s) => `<option value="${s}">${s}</option>`).join("");
  if (steps.length && (follow || !steps.includes(state.step))) state.step = steps[steps.length - 1];
  if (state.step !== null) select.value = String(state.step);
  await loadRollouts();
}

async function loadRollouts() {
  if (state.step === null) return;
  state.rollouts = await getJSON(`/api/rollouts?run=${encodeURIComponent(primary())}&step=${state.step}`);
  const kinds = [...new Set(state.rollouts.map((r) => r.failure).filter(Boolean))].sort();
  const failure = $("#failure");
  const chosen = failure.value;
  failure.innerHTML = '<option value="">any</option><option value="ok">none (finished)</option>' +
    kinds.map((k) => `<option value="${esc(k)}">${esc(k)}</option>`).join("");
  failure.value = [...failure.options].some((o) => o.value === chosen) ? chosen : "";
  drawRollouts();
}

function drawRollouts() {
  const failure = $("#failure").value;
  const minReward = $("#min-reward").value === "" ? null : Number($("#min-reward").value);
  let rows = state.rollouts.filter((r) => (failure === "" || (failure === "ok" ? !r.failure : r.failure === failure)) &&
    (minReward === null || (r.reward !== null && r.reward >= minReward)));
  const sort = $("#sort").value;
  const reward = (r) => (r.reward === null ? -Infinity : r.reward);
  rows = rows.sort(sort === "group" ? (a, b) => a.group - b.group : sort === "reward-asc" ? (a, b) => reward(a) - reward(b) : (a, b) => reward(b) - reward(a));
  $("#rollouts-run").textContent = primary() ? `(${primary()}, step ${state.step ?? "-"})` : "";
  $("#rollouts tbody").innerHTML = rows.map((r) =>
    `<tr class="rollout-row${r.rollout_id === state.openRollout ? " selected" : ""}" data-id="${esc(r.rollout_id)}"><td>${esc(r.rollout_id)}</td><td>${esc(r.group)}</td>` +
    `<td>${esc(fmt(r.reward))}</td><td class="fail">${esc(r.failure || "")}</td><td>${esc(r.turns)}</td>` +
    `<td>${esc(r.tool_calls)}</td><td>${r.trained ? "yes" : ""}</td></tr>`).join("");
  $("#rollouts tbody").querySelectorAll("tr").forEach((tr) => tr.addEventListener("click", () => openRollout(tr.dataset.id)));
}

function content(c) {
  if (c === null || c === undefined) return "";
  if (typeof c === "string") return c;
  if (Array.isArray(c)) return c.map((p) => (p && typeof p === "object" ? p.text ?? JSON.stringify(p) : String(p))).join("\n");
  return JSON.stringify(c);
}

function messageHTML(m) {
  const calls = (m.tool_calls || []).map((call) => {
    const fn = call.function || call;
    const args = typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments);
    return `<div class="call">→ ${esc(fn.name)}(${esc(args)})${call.id ? ` <span class="muted">${esc(call.id)}</span>` : ""}</div>`;
  }).join("");
  const reply = m.tool_call_id ? `<span class="muted"> ← ${esc(m.tool_call_id)}</span>` : "";
  return `<div class="msg ${esc(m.role)}"><div class="role">${esc(m.role)}${reply}</div><pre>${esc(content(m.content))}</pre>${calls}</div>`;
}

function tokensHTML(sample) {
  // trained tokens are tinted by how likely the sampler found them; the rest (prompt, tool results) are grey
  return sample.ids.map((id, i) => {
    const piece = sample.pieces ? sample.pieces[i] : `${id} `;
    if (!sample.mask[i]) return `<span class="tok masked" title="id ${id}: not trained">${esc(piece)}</span>`;
    const lp = sample.logprobs[i];
    const p = lp === null ? 0 : Math.exp(lp);
    const hue = sample.advantage >= 0 ? 140 : 0;
    return `<span class="tok trained" style="background:hsla(${hue},70%,55%,${(0.15 + 0.6 * (1 - p)).toFixed(2)})" ` +
      `title="id ${id} · logprob ${lp === null ? "?" : lp.toFixed(4)} · advantage ${fmt(sample.advantage)}">${esc(piece)}</span>`;
  }).join("");
}

async function openRollout(id) {
  state.openRollout = id;
  drawRollouts();
  const run = primary();
  const r = await getJSON(`/api/rollout?run=${encodeURIComponent(run)}&step=${state.step}&id=${encodeURIComponent(id)}`);
  const facts = [`reward ${fmt(r.reward)}`, `group ${r.group}`, `task ${r.task_index}`, `termination ${r.termination_reason ?? "-"}`,
    r.failure ? `failure ${r.failure}` : null, r.reason ? `reason: ${r.reason}` : null,
    r.status?.message ? `status ${r.status.code}: ${r.status.message}` : null].filter(Boolean);
  const samples = r.samples.length
    ? r.samples.map((s, i) => `<h4>sample ${i + 1}: advantage ${fmt(s.advantage)}, ${s.mask.filter(Boolean).length} trained of ${s.ids.length} tokens</h4>` +
      `<div class="tokens">${tokensHTML(s)}</div>`).join("")
    : '<p class="muted">No tokens trained from this rollout (not in a trained group, or the run predates token dumps).</p>';
  $("#rollout-detail").classList.remove("muted");
  $("#rollout-detail").innerHTML = `<div class="muted">${esc(r.rollout_id)} — ${esc(facts.join(" · "))}</div>` +
    `<h3>Conversation</h3><div id="conversation">${(r.messages || []).map(messageHTML).join("") || '<p class="muted">no messages recorded</p>'}</div>` +
    `<h3>Trained tokens</h3><div class="legend">grey: not trained (prompt, tool results); tinted: sampled and trained ` +
    `(green: positive advantage, red: negative; stronger: less likely under the sampler). Hover a token for its logprob.</div>${samples}` +
    `<h3>Trace</h3><div id="trace" class="timeline"></div>`;
  drawTrace(await getJSON(`/api/trace?run=${encodeURIComponent(run)}&id=${encodeURIComponent(id)}`));
}

function drawTrace(spans) {
  const box = $("#trace");
  if (!spans.length) { box.innerHTML = '<p class="muted">No trace for this rollout (tracing off: install openrft[otel] and set trace.enabled).</p>'; return; }
  const t0 = Math.min(...spans.map((s) => s.start_ns));
  const t1 = Math.max(...spans.map((s) => s.end_ns));
  const total = Math.max(1, t1 - t0);
  box.innerHTML = spans.map((s) => {
    const left = (100 * (s.start_ns - t0)) / total;
    const width = Math.max(0.3, (100 * (s.end_ns - s.start_ns)) / total);
    const attrs = Object.entries(s.attributes || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    return `<div class="span-row" title="${esc(attrs)}"><div class="span-label">${esc(s.name)} ` +
      `<span class="muted">${((s.end_ns - s.start_ns) / 1e6).toFixed(1)} ms</span></div>` +
      `<div class="span-track"><div class="span-bar" style="left:${left}%;width:${width}%"></div></div></div>`;
  }).join("");
}

// --- the loop -----------------------------------------------------------------------------------

async function refreshPrimary(reset) {
  if (reset) { state.step = null; $("#step").innerHTML = ""; state.rollouts = []; drawRollouts(); await drawEvals(); }
  await refreshSteps();
}

async function poll() {
  try {
    await loadRuns();
    if (await pollMetrics()) { drawCharts(); await drawEvals(); }
    await refreshSteps();
    const rows = state.metrics[primary()] || [];
    $("#live").textContent = rows.length ? `step ${rows[rows.length - 1].step} · updated ${new Date().toLocaleTimeString()}` : "no steps yet";
  } catch (err) {
    $("#live").textContent = `error: ${err.message}`;
  }
  setTimeout(poll, POLL_MS);
}

$("#step").addEventListener("change", () => { state.step = Number($("#step").value); loadRollouts(); });
["#failure", "#sort"].forEach((s) => $(s).addEventListener("change", drawRollouts));
$("#min-reward").addEventListener("input", drawRollouts);

(async () => {
  await loadRuns();
  drawRunPicker();
  rebuildCharts();
  await drawEvals();
  poll();
})();
