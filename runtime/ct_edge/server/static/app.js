// ct-edge page: upload files to /v1/classify, show each answer, list the results store.
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
    return ["out_of_domain", "NOT ANSWERED: this image is outside what the model knows",
            result.reason || "it is unlike the images the model was trained on"];
  }
  if (result.status === "uncertain") {
    return ["uncertain", "UNCERTAIN: the model is not confident; do not rely on this label",
            result.reason || ""];
  }
  return ["ok", "Answered", "confidence at or above the bundle's operating point"];
}

function statusTag(status, error) {
  const names = { ok: "answered", uncertain: "uncertain", out_of_domain: "not answered" };
  const key = error ? "error" : status;
  return el("span", { class: "tag " + key }, error ? "unreadable" : (names[status] || status));
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
                   el("td", {}, statusTag(row.status, row.error)),
                   el("td", {}, heat)));
  }
  document.getElementById("history-empty").hidden = data.results.length > 0;
}

async function loadModel() {
  const response = await api("/v2/models/ct-edge");
  if (!response.ok) return false;
  const meta = await response.json();
  labels = meta.parameters.labels;
  document.getElementById("model").textContent = "Model: " + meta.parameters.artifact +
    " (bundle " + meta.parameters.bundle_sha256.slice(0, 12) + "); classes: " + labels.join(", ");
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
  document.getElementById("status-filter").addEventListener("change", loadHistory);
  document.getElementById("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    if (await loadModel()) {
      document.getElementById("token-section").hidden = true;
      loadHistory();
    }
  });
  loadModel().then((ok) => { if (ok) loadHistory(); });
}

document.addEventListener("DOMContentLoaded", setup);
