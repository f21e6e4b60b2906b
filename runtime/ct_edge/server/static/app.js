// ct-edge page: upload files to /v1/classify, show each answer, list the results store and the
// DICOM series `ct-edge listen` received.
"use strict";

const TOKEN_KEY = "ct-edge-token";
let labels = [];

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    document.getElementById("token-section").hidden = false;
    document.getElementById("token").focus();
  }
  return response;
}

async function errorText(response) {
  try { return (await response.json()).error || response.statusText; }
  catch (e) { return response.status + " " + response.statusText; }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

// The status in plain words; uncertain and out-of-domain answers are never shown as plain results.
function statusWords(result) {
  if (result.error) return ["error", "Could not read this file", result.error];
  if (result.status === "out_of_domain") {
    return ["out_of_domain", "OUT OF DOMAIN: no label; this image is outside what the model knows",
            result.reason || "it is unlike the images the model was trained on"];
  }
  if (result.status === "uncertain") {
    return ["uncertain", "UNCERTAIN: the model is not confident; do not rely on this label",
            result.reason || ""];
  }
  return ["ok", "OK: answered from inside the model's domain",
          "confidence at or above the bundle's operating point"];
}

function statusTag(status, error) {
  // The same words as ct_edge.STATUS_WORDS (the CLI table and `ct-edge results`).
  const names = { ok: "ok", uncertain: "uncertain", out_of_domain: "out of domain" };
  const key = error ? "error" : status;
  return el("span", { class: "tag " + key }, error ? "unreadable" : (names[status] || status));
}

function parityMark(row) {
  // A stored answer of an artifact that missed its parity check: marked as `ct-edge results` does.
  if (row.artifact_parity == null || row.artifact_parity === "passed") return "";
  const why = "artifact '" + row.artifact + "' has parity status '" + row.artifact_parity +
              "'; its answers may differ from the reference model";
  return el("span", { class: "parity-mark", title: why, "aria-label": why }, " *");
}

async function heatmapImage(url, name) {
  const response = await api(url);
  if (!response.ok) return null;
  const blob = await response.blob();
  return el("img", { src: URL.createObjectURL(blob),
                     alt: "Heatmap for " + name + ": red marks where the answer comes from" });
}

async function showCard(name, result) {
  const [kind, title, detail] = statusWords(result);
  const card = el("article", { class: "card", "data-status": kind });
  const text = el("div", {});
  text.append(el("h3", {}, name));
  text.append(el("p", { class: "status " + kind, role: kind === "ok" ? "status" : "alert" },
                 title, detail ? el("span", { class: "detail" }, detail) : null));
  if (result.label) {
    text.append(el("p", { class: "label" + (kind === "uncertain" ? " struck" : "") },
                   result.label + " " + pct(result.confidence)));
  }
  if (result.probabilities && Object.keys(result.probabilities).length) {
    const list = el("ul", { class: "bars", "aria-label": "Probability per class" });
    for (const label of (labels.length ? labels : Object.keys(result.probabilities))) {
      const p = result.probabilities[label] || 0;
      const fill = el("div", { class: "fill" });
      fill.style.width = pct(p);
      list.append(el("li", {}, el("span", {}, label),
                     el("div", { class: "track", role: "img", "aria-label": label + " " + pct(p) }, fill),
                     el("span", { class: "pct" }, pct(p))));
    }
    if (kind === "out_of_domain") {  // model output, but not an answer: folded away
      text.append(el("details", {}, el("summary", {}, "Raw model output (not an answer)"), list));
    } else {
      text.append(list);
    }
  }
  if (result.id) text.append(el("p", { class: "hint" }, "Stored as result #" + result.id));
  card.append(text);
  if (result.heatmap) {
    const image = await heatmapImage(result.heatmap, name);
    if (image) {
      card.classList.add("has-image");
      card.append(el("figure", { class: "heatmap" }, image,
                     el("figcaption", {}, "Heatmap over the image as the model saw it")));
    }
  }
  document.getElementById("cards").prepend(card);
}

async function classify(file) {
  const response = await api("/v1/classify?explain=1&name=" + encodeURIComponent(file.name),
                             { method: "POST", body: file,
                               headers: { "Content-Type": "application/octet-stream" } });
  if (!response.ok) {
    await showCard(file.name, { error: await errorText(response) });
    return;
  }
  await showCard(file.name, await response.json());
}

async function classifyAll(files) {
  for (const file of files) await classify(file);  // one at a time: a small device, two cores
  await loadHistory();
}

async function loadHistory() {
  const status = document.getElementById("status-filter").value;
  const response = await api("/v1/results?limit=20" + (status ? "&status=" + status : ""));
  if (!response.ok) return;
  const data = await response.json();
  const body = document.querySelector("#history tbody");
  body.replaceChildren();
  for (const row of data.results) {
    const result = row.label ? row.label + " " + pct(row.confidence || 0) : "-";
    let heat = "-";
    if (row.heatmap) {
      heat = el("a", { href: "#", "data-url": row.heatmap }, "view");
      heat.addEventListener("click", async (event) => {
        event.preventDefault();
        const image = await heatmapImage(row.heatmap, row.source);
        if (image) { image.style.maxWidth = "128px"; event.target.replaceWith(image); }
      });
    }
    body.append(el("tr", { "data-id": String(row.id) },
                   el("td", {}, String(row.id)),
                   el("td", {}, row.created_at.replace("T", " ").replace("Z", "")),
                   el("td", { class: "file" }, row.source),
                   el("td", {}, result),
                   el("td", {}, statusTag(row.status, row.error), parityMark(row)),
                   el("td", {}, heat)));
  }
  document.getElementById("history-empty").hidden = data.results.length > 0;
}

// --- DICOM series (ct-edge listen) ---------------------------------------------------------------

const SERIES_REFRESH_MS = 5000;
const seriesCache = new Map();  // id -> { key, data }: a series is fetched again only when it changed
let shownSeries = null;  // what the cards show now, as the list of [id, key]

function shortUid(uid) {
  return uid && uid.length > 14 ? "\u2026" + uid.slice(-12).replace(/^\./, "") : (uid || "-");
}

function utcTime(text) { return text ? text.replace("T", " ").replace(/\.\d+Z$|Z$/, "") + " UTC" : ""; }

function labelClass(label) {
  const index = labels.indexOf(label);
  return "label-" + (index < 0 ? "x" : index % 6);
}

function sliceKind(slice) {
  if (slice.state === "received") return "waiting";
  if (slice.error || !slice.status) return "error";
  return slice.status;
}

function sliceWords(slice, index, total) {
  const where = "Slice " + (index + 1) + " of " + total +
    (slice.slice_location !== null && slice.slice_location !== undefined
      ? " (at " + slice.slice_location + " mm)" : "");
  const kind = sliceKind(slice);
  if (kind === "waiting") return where + ": received, not classified yet";
  if (kind === "error") return where + ": unreadable (" + (slice.error || "no result") + ")";
  if (kind === "out_of_domain") return where + ": out of domain, no label (" + (slice.reason || "") + ")";
  const answer = slice.label + " " + pct(slice.confidence || 0);
  return where + ": " + answer + (kind === "uncertain" ? ", uncertain" : ", ok");
}

function seriesStatus(series) {
  if (series.state !== "complete") {
    return ["receiving", "RECEIVING: slices are still arriving; the series result comes " +
            "once none has arrived for a while", ""];
  }
  if (!series.status) return ["error", "NO RESULT: none of the slices could be read", series.reason || ""];
  if (series.status === "out_of_domain") {
    return ["out_of_domain", "OUT OF DOMAIN: no label; this series is outside what the model knows",
            series.reason || "most of its slices are unlike the images the model was trained on"];
  }
  return statusWords(series);
}

// One focusable ribbon (a single Tab stop); arrow keys, Home and End move between slices.
function ribbon(series, detail) {
  const slices = series.slices;
  const list = el("ol", { class: "ribbon", "aria-label": "Slices of this series, head to feet: " +
                          slices.length + ". Use the arrow keys to read each slice." });
  const cells = slices.map((slice, i) => {
    const words = sliceWords(slice, i, slices.length);
    const kind = sliceKind(slice);
    const cell = el("li", { class: "cell " + kind + (kind === "ok" ? " " + labelClass(slice.label) : ""),
                            tabindex: i === 0 ? "0" : "-1", "aria-label": words, title: words,
                            "data-index": String(i), "data-status": kind });
    const show = () => { detail.textContent = words; };
    cell.addEventListener("focus", show);
    cell.addEventListener("mouseenter", show);
    cell.addEventListener("click", () => cell.focus());
    return cell;
  });
  list.addEventListener("keydown", (event) => {
    const at = cells.indexOf(document.activeElement);
    if (at < 0) return;
    const to = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1,
                 Home: 0, End: cells.length - 1 }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    const next = cells[Math.max(0, Math.min(cells.length - 1, to))];
    cells[at].tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  });
  list.append(...cells);
  return list;
}

function seriesCard(series) {
  const [kind, title, reason] = seriesStatus(series);
  const card = el("article", { class: "series", "data-series-id": String(series.id),
                               "data-state": series.state, "data-status": kind });
  const heading = (series.description || "(no description)") + " \u00b7 " + (series.modality || "?");
  card.append(el("h3", {}, heading));
  card.append(el("p", { class: "ids" },
                 "Study " + shortUid(series.study_uid) + " \u00b7 Series " + shortUid(series.series_uid) +
                 " \u00b7 " + (series.state === "complete" ? "complete " : "receiving, last slice ") +
                 utcTime(series.completed_at || series.last_received_at)));
  const quiet = kind === "ok" || kind === "receiving";
  card.append(el("p", { class: "status " + kind, role: quiet ? "status" : "alert" }, title,
                 reason ? el("span", { class: "detail" }, reason) : null));
  if (series.state === "complete" && series.label) {
    card.append(el("p", { class: "label" + (kind === "uncertain" ? " struck" : "") },
                   "Series: " + series.label + " " + pct(series.confidence || 0)));
  }
  const p = series.progress;
  const answered = p.ok + p.uncertain;
  card.append(el("p", { class: "counts" },
                 p.slices + " slices \u00b7 " + answered + " classified" +
                 (p.uncertain ? " (" + p.uncertain + " uncertain)" : "") + " \u00b7 " +
                 p.out_of_domain + " out of domain \u00b7 " + p.unreadable + " unreadable" +
                 (p.waiting ? " \u00b7 " + p.waiting + " waiting" : "")));
  const detail = el("p", { class: "slice-detail hint", "aria-live": "polite" },
                    "Point at or focus a slice to read its result.");
  card.append(ribbon(series, detail), detail);
  return card;
}

async function seriesDetail(row) {
  const key = JSON.stringify([row.state, row.last_received_at, row.completed_at, row.progress]);
  const cached = seriesCache.get(row.id);
  if (cached && cached.key === key) return cached.data;
  const response = await api("/v1/series/" + row.id);
  if (!response.ok) return null;
  const data = await response.json();
  seriesCache.set(row.id, { key, data });
  return data;
}

async function loadSeries() {
  const response = await api("/v1/series?limit=10");
  if (!response.ok) return;
  const page = await response.json();
  const details = (await Promise.all(page.series.map(seriesDetail))).filter(Boolean);
  document.getElementById("series-updated").textContent = page.total + " series; updated " +
    new Date().toISOString().slice(11, 19) + " UTC";
  // Nothing changed: leave the cards (and whatever someone is reading in them) alone.
  const signature = JSON.stringify(page.series.map(
    (row) => [row.id, (seriesCache.get(row.id) || {}).key]));
  if (signature === shownSeries) return;
  shownSeries = signature;
  const box = document.getElementById("series-list");
  // A refresh must not take the keyboard focus away from the slice someone is reading.
  const focused = document.activeElement;
  const focusSeries = focused && focused.closest ? focused.closest(".series") : null;
  const restore = focusSeries && focused.classList.contains("cell")
    ? [focusSeries.dataset.seriesId, focused.dataset.index] : null;
  box.replaceChildren(...details.map(seriesCard));
  if (restore) {
    const cell = box.querySelector('.series[data-series-id="' + restore[0] + '"] .cell[data-index="' +
                                   restore[1] + '"]');
    if (cell) {
      for (const other of cell.parentNode.children) other.tabIndex = -1;
      cell.tabIndex = 0;
      cell.focus();
    }
  }
  document.getElementById("series-empty").hidden = details.length > 0;
}

function seriesLegend() {
  const legend = document.getElementById("series-legend");
  legend.querySelectorAll(".label-item").forEach((item) => item.remove());
  labels.slice().reverse().forEach((label) => {
    legend.prepend(el("li", { class: "label-item" },
                      el("span", { class: "cell ok " + labelClass(label), "aria-hidden": "true" }),
                      " " + label + " (ok)"));
  });
}

let seriesTimer = null;

function startSeries() {
  seriesLegend();
  loadSeries();
  if (seriesTimer === null) {
    seriesTimer = setInterval(() => {
      if (document.visibilityState === "visible") loadSeries();
    }, SERIES_REFRESH_MS);
  }
}

async function loadModel() {
  const response = await api("/v2/models/ct-edge");
  if (!response.ok) return false;
  const meta = await response.json();
  labels = meta.parameters.labels;
  document.getElementById("model").textContent = "Model: " + meta.parameters.artifact +
    " (bundle " + meta.parameters.bundle_sha256.slice(0, 12) + "); classes: " + labels.join(", ");
  const warning = document.getElementById("parity-warning");
  warning.textContent = meta.parameters.parity_warning ? "Warning: " + meta.parameters.parity_warning : "";
  warning.hidden = !meta.parameters.parity_warning;
  return true;
}

function setup() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => { classifyAll([...input.files]); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    classifyAll([...event.dataTransfer.files]);
  });
  document.getElementById("refresh").addEventListener("click", loadHistory);
  document.getElementById("series-refresh").addEventListener("click", loadSeries);
  document.getElementById("status-filter").addEventListener("change", loadHistory);
  document.getElementById("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    if (await loadModel()) {
      document.getElementById("token-section").hidden = true;
      loadHistory();
      startSeries();
    }
  });
  loadModel().then((ok) => { if (ok) { loadHistory(); startSeries(); } });
}

document.addEventListener("DOMContentLoaded", setup);
