// The runs list: /api/runs every 2 s.
"use strict";
let lastRuns = null;

function renderRuns(data) {
  const table = document.getElementById("runs");
  const empty = document.getElementById("empty");
  if (!data.runs.length) {
    table.hidden = true;
    empty.hidden = false;
    empty.textContent = data.runs_dir_exists
      ? "No runs in " + data.runs_dir + " yet. A federation started with `flwr run .` appears here by itself."
      : "The runs folder " + data.runs_dir + " does not exist yet; it appears with the first run.";
    return;
  }
  empty.hidden = true;
  table.hidden = false;
  const body = table.querySelector("tbody");
  body.replaceChildren(...data.runs.map((r) => el("tr", { dataset: { run: r.name } },
    el("td", {}, el("a", { href: "/runs/" + encodeURIComponent(r.name) }, r.name)),
    el("td", { title: r.error || r.reason || "" }, badge(r.status), r.error ? el("div", { class: "reason" }, r.error) : null),
    el("td", { class: "num" }, r.rounds_done === null ? "n/a" : r.rounds_done),
    el("td", { class: "num dice" }, fmt.dice(r.last_dice)),
    el("td", { class: "num" }, fmt.dice(r.last_dice_personal)),
    el("td", {}, fmt.time(r.started_at)),
  )));
}

async function refreshRuns() {
  const { ok, body, text } = await getJSON("/api/runs");
  if (!ok) { showError(body.error || "cannot list the runs"); return; }
  hideError();
  if (text !== lastRuns) { lastRuns = text; renderRuns(body); }
}

refreshRuns();
setInterval(refreshRuns, POLL_MS);
