// Shared helpers of the dashboard pages (no dependencies; text is always set as text, never as HTML).
"use strict";
const POLL_MS = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmt = {
  dice: (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(4)),
  bytes: (x) => (x === null || x === undefined ? "n/a" : Number(x).toLocaleString("en-US") + " B"),
  human: (x) => {
    if (x === null || x === undefined) return "";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let v = Number(x), i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  },
  secs: (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(1) + " s"),
  num: (x, d = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d)),
  time: (x) => (x ? String(x).replace("T", " ").replace("+00:00", "") : "n/a"),
};

function badge(status) {
  return el("span", { class: "badge status-" + status }, status);
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  document.getElementById("error").hidden = true;
}

// GET a JSON API route; resolves to {ok, body, text} and never throws (errors become a message).
// `text` is the response as received: the pages redraw when it changed, whatever changed in it.
async function getJSON(url) {
  let res, text = "";
  try {
    res = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    text = await res.text();
  } catch (err) {
    return { ok: false, body: { error: "the dashboard is unreachable (" + err + "); retrying" }, text: "" };
  }
  let body;
  try { body = JSON.parse(text); } catch (err) { body = { error: "HTTP " + res.status + " " + res.statusText }; }
  return { ok: res.ok, body: body, text: text };
}
