// A run's page: /api/runs/<name> every 2 s, asking only for the rounds after those it holds
// (?since=<last round>&base=<rounds_key>; the server sends the whole run again when those changed,
// e.g. a resume rewrote them); everything is redrawn when the run changed.
"use strict";
const RUN = document.body.dataset.run;
const API = "/api/runs/" + encodeURIComponent(RUN);
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const charts = {};
let lastKey = null;
let held = null;  // the run as last merged: {run, rounds, downloads, rounds_key, ...}

Chart.defaults.animation = false;
Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
Chart.defaults.maintainAspectRatio = false;
Chart.defaults.plugins.legend.labels.usePointStyle = true;  // dashed lines make poor legend boxes

// Log-scale ticks: label 1, 2 and 5 times a power of ten only (the others crowd the axis).
function logTick(value) {
  const m = value / Math.pow(10, Math.floor(Math.log10(value)));
  return [1, 2, 5].some((k) => Math.abs(m - k) < 1e-6) ? fmt.human(value) : "";
}

// A long run's points are drawn as a line only: thousands of dots cost the redraw most of its time
// and, a pixel or less apart, show nothing a line does not.
const POINTS_UP_TO = 200;

function line(label, data, color, extra) {
  return Object.assign({ label, data, borderColor: color, backgroundColor: color, spanGaps: true,
                         tension: 0, pointRadius: data.length > POINTS_UP_TO ? 0 : 3, borderWidth: 2 }, extra || {});
}

// A chart that exists is given its new data and options and redrawn in place (a new Chart per
// round rebuilt every scale and element of a 5,000-round chart); a new type of chart is made anew.
function draw(id, config) {
  const canvas = document.getElementById(id);
  canvas.parentElement.classList.remove("off");
  const chart = charts[id];
  if (chart && chart.config.type === config.type) {
    chart.data = config.data;
    chart.options = config.options;
    chart.update("none");
  } else {
    if (chart) chart.destroy();
    charts[id] = new Chart(canvas, config);
  }
  canvas.dataset.datasets = config.data.datasets.length;
}

function hideChart(id, note) {
  if (charts[id]) { charts[id].destroy(); delete charts[id]; }
  const canvas = document.getElementById(id);
  canvas.parentElement.classList.add("off");
  canvas.dataset.datasets = 0;
  return note;
}

function axes(yTitle, extra) {
  return { x: { title: { display: true, text: "round" } }, y: Object.assign({ title: { display: true, text: yTitle } }, extra || {}) };
}

function cumulative(values) {
  let s = 0;
  return values.map((v) => (v === null ? null : (s += v)));
}

function siteNames(rounds) {
  const names = new Set();
  rounds.forEach((r) => r.sites.forEach((s) => names.add(s.site)));
  return [...names].sort();
}

// The latest round's non-null value of `key`, or null: a skipped round (e.g. every site out of its
// privacy budget) records no Dice and no epsilon, and must not blank the run's figures.
function latest(rounds, key) {
  for (let i = rounds.length - 1; i >= 0; i--) {
    if (rounds[i][key] !== null && rounds[i][key] !== undefined) return rounds[i][key];
  }
  return null;
}

// The largest recorded `key`: the epsilon spent so far. Each site's epsilon only grows, but a round
// records only the sites it sampled, so the latest round's maximum can be below an earlier one's.
function largest(rounds, key) {
  const values = rounds.map((r) => r[key]).filter((v) => v !== null && v !== undefined);
  // A loop, not Math.max(...values): spreading more than ~100k arguments throws (a 1,000,000-round run).
  return values.length ? values.reduce((a, b) => Math.max(a, b)) : null;
}

function renderFigures(data) {
  const { run, rounds } = data;
  const ok = rounds.filter((r) => r.status === "ok");
  const lastOk = ok.length ? ok[ok.length - 1] : null;  // as final/summary.json's final_dice
  const configured = run.config.rounds;
  document.getElementById("fig-rounds").textContent = rounds.length + (configured ? " / " + configured : "");
  document.getElementById("fig-dice").textContent = lastOk ? fmt.dice(lastOk.dice) : "n/a";
  document.getElementById("fig-dice-personal").textContent = lastOk ? fmt.dice(lastOk.dice_personal) : "n/a";
  document.getElementById("fig-dice").title = lastOk ? "round " + lastOk.round : "";
  const sum = (k) => rounds.reduce((a, r) => a + (r[k] || 0), 0);
  const up = sum("payload_bytes_up"), down = sum("payload_bytes_down");
  document.getElementById("fig-bytes-up").textContent = fmt.bytes(up);
  document.getElementById("fig-bytes-up").title = fmt.human(up);
  document.getElementById("fig-bytes-down").textContent = fmt.bytes(down);
  document.getElementById("fig-bytes-down").title = fmt.human(down);
  const full = run.full_model_bytes === null ? null : sum("full_model_bytes_up") + sum("full_model_bytes_down");
  document.getElementById("fig-full-model").textContent =
    full === null ? "n/a" : fmt.bytes(full) + (up + down ? " (" + (full / (up + down)).toFixed(1) + "x this run)" : "");
  const dp = run.config.dp && run.config.dp !== "off" ? run.config.dp : null;
  const eps = largest(rounds, "epsilon_server") ?? largest(rounds, "epsilon_max");
  const budget = run.config["dp-epsilon-budget"];
  document.getElementById("fig-epsilon-label").textContent = dp === "client" ? "privacy (\u03b5, server)"
    : dp === "sample" ? "privacy (\u03b5, max over sites)" : "privacy (\u03b5)";
  document.getElementById("fig-epsilon").textContent = eps !== null && eps !== undefined
    ? fmt.num(eps, 2) + (budget ? " of " + budget : "") : (dp ? "DP " + dp + ", no figure yet" : "off");
  const status = document.getElementById("run-status");
  status.replaceWith(Object.assign(badge(run.status), { id: "run-status" }));
  const reason = document.getElementById("status-reason");
  reason.hidden = !(run.reason || run.status === "failed" || run.status === "stopped");
  reason.className = "banner " + (run.status === "failed" ? "error" : "warn");
  reason.textContent = run.status + (run.reason ? ": " + run.reason : "");
  document.getElementById("times").textContent = "started " + fmt.time(run.started_at) + " UTC" +
    (run.ended_at ? " | ended " + fmt.time(run.ended_at) + " UTC" : "") + " | last update " + fmt.time(run.updated_at) +
    " UTC" + (run.source === "rounds.jsonl" ? " | imported from rounds.jsonl" : "");
}

function renderCharts(data) {
  const { run, rounds } = data;
  const labels = rounds.map((r) => r.round);
  const col = (k) => rounds.map((r) => r[k]);
  document.getElementById("no-rounds").hidden = rounds.length > 0;
  document.getElementById("charts").hidden = rounds.length === 0;
  if (!rounds.length) return;

  draw("chart-dice", { type: "line", data: { labels, datasets: [
    line("global", col("dice"), PALETTE[0]),
    line("personalised", col("dice_personal"), PALETTE[1], { borderDash: [6, 3] }),
  ] }, options: { scales: axes("Dice", { min: 0, max: 1 }) } });

  draw("chart-loss", { type: "line", data: { labels, datasets: [
    line("train loss (last epoch)", col("train_loss"), PALETTE[4]),
    line("validation loss", col("val_loss"), PALETTE[5]),
  ] }, options: { scales: axes("loss") } });

  const names = siteNames(rounds);
  const siteValue = (name, key) => rounds.map((r) => {
    const s = r.sites.find((x) => x.site === name);
    return s ? s[key] : null;
  });
  draw("chart-sites", { type: "line", data: { labels, datasets: names.map((n, i) =>
    line(n, siteValue(n, "val_dice"), PALETTE[i % PALETTE.length])) },
    options: { scales: axes("validation Dice", { min: 0, max: 1 }) } });

  const hasFull = run.full_model_bytes !== null;
  const payload = [
    { type: "bar", label: "up (sites to server)", data: col("payload_bytes_up"), backgroundColor: PALETTE[0] },
    { type: "bar", label: "down (server to sites)", data: col("payload_bytes_down"), backgroundColor: PALETTE[2] },
  ];
  if (hasFull) {
    payload.push(line("full-model FedAvg (up + down)", rounds.map((r) => r.full_model_bytes_up + r.full_model_bytes_down),
      PALETTE[1], { type: "line", borderDash: [6, 3] }));
  }
  const bytesAxis = hasFull ? { type: "logarithmic", ticks: { callback: logTick } }
                            : { type: "linear", ticks: { callback: (v) => fmt.human(v) } };
  draw("chart-payload", { type: "bar", data: { labels, datasets: payload },
    options: { scales: axes("bytes per round", bytesAxis) } });
  document.getElementById("payload-note").textContent = hasFull
    ? "Full-model FedAvg: the base's " + Number(run.full_model_parameters).toLocaleString("en-US") +
      " parameters per message at this run's wire dtype (" + fmt.bytes(run.full_model_bytes) + "), same messages. Log scale."
    : "Full-model FedAvg comparison: n/a (the run did not record its base's parameter count).";

  const ours = cumulative(rounds.map((r) => (r.payload_bytes_up || 0) + (r.payload_bytes_down || 0)));
  const cum = [line("this run (up + down)", ours, PALETTE[0])];
  if (hasFull) cum.push(line("full-model FedAvg", cumulative(rounds.map((r) => r.full_model_bytes_up + r.full_model_bytes_down)),
    PALETTE[1], { borderDash: [6, 3] }));
  draw("chart-cumulative", { type: "line", data: { labels, datasets: cum },
    options: { scales: axes("cumulative bytes", bytesAxis) } });

  const anyEps = rounds.some((r) => r.epsilon_server !== null || r.epsilon_max !== null || r.sites.some((s) => s.epsilon !== null));
  const dp = run.config.dp && run.config.dp !== "off" ? run.config.dp : null;
  const epsNote = document.getElementById("epsilon-note");
  if (!anyEps) {
    epsNote.textContent = hideChart("chart-epsilon", dp
      ? "Privacy mode '" + dp + "': no epsilon recorded yet."
      : "Privacy mode off: no differential privacy, so no epsilon to show.");
  } else {
    const sets = names.map((n, i) => line(n, siteValue(n, "epsilon"), PALETTE[i % PALETTE.length]));
    if (rounds.some((r) => r.epsilon_server !== null)) sets.push(line("server", col("epsilon_server"), "#111827", { borderWidth: 3 }));
    const budget = run.config["dp-epsilon-budget"];
    if (budget) sets.push(line("budget", labels.map(() => Number(budget)), "#6b7280", { borderDash: [2, 4], pointRadius: 0 }));
    draw("chart-epsilon", { type: "line", data: { labels, datasets: sets }, options: { scales: axes("epsilon", { min: 0 }) } });
    const delta = latest(rounds, "delta");
    epsNote.textContent = "delta " + (delta === null ? "n/a" : delta) + (dp ? " | mode " + dp : "") +
      (budget ? " | budget " + budget : "");
  }
}

function eventChips(r) {
  const chips = [];
  r.failed.forEach((e) => chips.push(el("div", { class: "event failed" }, "failed: " + e.site + (e.phase ? " (" + e.phase + ")" : "") + ": " + e.reason)));
  r.excluded.forEach((e) => chips.push(el("div", { class: "event excluded" }, "excluded: " + e.site + (e.phase ? " (" + e.phase + ")" : "") + ": " + e.reason)));
  return chips.length ? chips : ["-"];
}

// The timeline lists the latest TIMELINE_ROWS rounds unless asked for all: the rows of a 5,000-round
// run took seconds to lay out again at every new round (the charts show every round).
const TIMELINE_ROWS = 200;
let timelineAll = false;

function timelineNote(count) {
  const note = document.getElementById("timeline-note");
  note.hidden = count <= TIMELINE_ROWS;
  document.getElementById("timeline-shown").textContent = timelineAll
    ? "All " + count + " rounds."
    : "The latest " + TIMELINE_ROWS + " of " + count + " rounds.";
  document.getElementById("timeline-all").textContent = timelineAll ? "show the latest " + TIMELINE_ROWS : "show all";
}

function renderTables(data) {
  const { run, rounds } = data;
  const shown = timelineAll ? rounds : rounds.slice(-TIMELINE_ROWS);
  timelineNote(rounds.length);
  document.querySelector("#timeline tbody").replaceChildren(...shown.slice().reverse().map((r) => el("tr", { dataset: { round: r.round } },
    el("td", { class: "num" }, r.round),
    el("td", {}, badge(r.status)),
    el("td", {}, fmt.time(r.time)),
    el("td", { class: "num" }, fmt.secs(r.round_seconds)),
    el("td", { class: "num" }, fmt.secs(r.train_seconds)),
    el("td", { class: "num dice" }, fmt.dice(r.dice)),
    el("td", { class: "num dice-personal" }, fmt.dice(r.dice_personal)),
    el("td", { class: "num bytes-up", title: fmt.human(r.payload_bytes_up) }, fmt.bytes(r.payload_bytes_up)),
    el("td", { class: "num bytes-down", title: fmt.human(r.payload_bytes_down) }, fmt.bytes(r.payload_bytes_down)),
    el("td", {}, r.sites.map((s) => el("span", { class: "chip" + (s.trained ? " trained" : " evalonly"),
      title: s.trained ? "trained and evaluated" : "evaluated only (not sampled for training)" }, s.site))),
    el("td", {}, eventChips(r)),
  )));
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  document.querySelector("#sites tbody").replaceChildren(...(last ? last.sites : []).map((s) => el("tr", { dataset: { site: s.site } },
    el("td", {}, s.site),
    el("td", { class: "num" }, s.num_examples === null ? "-" : s.num_examples),
    el("td", { class: "num" }, fmt.num(s.train_loss, 4)),
    el("td", { class: "num" }, s.val_examples === null ? "-" : s.val_examples),
    el("td", { class: "num" }, fmt.dice(s.val_dice)),
    el("td", { class: "num" }, fmt.dice(s.val_dice_personal)),
    el("td", { class: "num" }, fmt.num(s.val_loss, 4)),
    el("td", { class: "num" }, fmt.bytes(s.payload_bytes_up)),
    el("td", { class: "num" }, fmt.bytes(s.payload_bytes_down)),
    el("td", { class: "num" }, s.epsilon === null ? "-" : fmt.num(s.epsilon, 3)),
  )));
  document.querySelector("#config tbody").replaceChildren(...Object.keys(run.config).sort().map((k) =>
    el("tr", {}, el("th", {}, k), el("td", {}, JSON.stringify(run.config[k])))));
  const list = document.getElementById("downloads");
  list.replaceChildren(...(data.downloads.length ? data.downloads.map((d) => el("li", {},
    el("a", { href: "/runs/" + encodeURIComponent(RUN) + "/download/" + d.name + ".zip" }, d.label))) : [el("li", {}, "nothing yet")]));
}

// The URL of the next poll: the rounds after the last one held, when any are held.
function pollUrl() {
  if (!held || !held.rounds.length) return API;
  const last = held.rounds[held.rounds.length - 1].round;
  return API + "?since=" + last + "&base=" + encodeURIComponent(held.rounds_key);
}

// The whole run from a response: the rounds held (the server found them unchanged up to `since`, the
// last of them) and the new ones after it, or the response itself when it is the whole run (since null).
function merge(body) {
  if (body.since === null || body.since === undefined || !held) return body;
  return Object.assign({}, body, { rounds: held.rounds.concat(body.rounds) });
}

let polling = false;  // one poll at a time: a slow answer must not be merged after a newer one

async function refresh() {
  if (polling) return;
  polling = true;
  try { await poll(); } finally { polling = false; }
}

async function poll() {
  const { ok, body, text } = await getJSON(pollUrl());
  if (!ok) { showError(body.error || "cannot read this run"); return; }
  hideError();
  // The whole response: a summary of it (status, update time to the second, counts) missed changes
  // made within one second that kept the counts, e.g. a config or meta written right after a round.
  if (text === lastKey) return;
  lastKey = text;
  held = merge(body);
  renderFigures(held);
  renderCharts(held);
  renderTables(held);
  document.body.dataset.rendered = held.rounds.length;
  document.body.dataset.polled = body.since === null ? "all" : "since " + body.since;
}

document.getElementById("timeline-all").addEventListener("click", () => {
  timelineAll = !timelineAll;
  if (held) renderTables(held);
});
refresh();
setInterval(refresh, POLL_MS);
