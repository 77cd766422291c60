// The comparison page: /models as a table, one image through every ready model, and the live
// latency of /metrics?format=json as a table and two charts (uPlot, vendored). No build step.
"use strict";

const REFRESH_MS = 3000;
const HISTORY = 200;  // points kept per series in the latency-over-time chart
const STAGES = ["decode", "preprocess", "queue", "inference", "total"];
const KEY_STORAGE = "cnn-serve-api-key";

// Read by the browser test too: what the page shows, and the data its charts hold.
const page = window.cnnServe = { models: [], summary: null, history: { t: [], p50: {} }, charts: {} };

const $ = (selector) => document.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// --- talking to the service ------------------------------------------------------------------

let keyPrompt = null;

function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("#key-dialog"), input = $("#key");
  dialog.querySelector("p").textContent = reason;
  dialog.hidden = false;
  input.value = "";
  input.focus();
  keyPrompt = new Promise((resolve) => {
    const use = () => {
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      dialog.hidden = true;
      keyPrompt = null;
      resolve();
    };
    $("#key-use").onclick = use;
    input.onkeydown = (event) => { if (event.key === "Enter") use(); };
  });
  return keyPrompt;
}

async function call(path, options = {}, tries = 3) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && tries > 1) {
    const body = await response.json().catch(() => ({}));
    await askForKey(`This service needs an API key to predict (${body.error || "unauthorized"}).`);
    return call(path, options, tries - 1);
  }
  return response;
}

async function failure(response) {
  // The service's own JSON error: {"error": message, "code": stable code}.
  const body = await response.json().catch(() => null);
  if (body && body.error) return `${body.error} (${response.status} ${body.code || ""})`.trim();
  return `HTTP ${response.status}`;
}

function notice(text) {
  const box = $("#notice");
  box.textContent = text || "";
  box.hidden = !text;
}

// --- models ----------------------------------------------------------------------------------

const count = (n, unit = "") => {
  if (n === null || n === undefined) return "–";
  for (const [size, suffix] of [[1e9, " G"], [1e6, " M"], [1e3, " k"]]) {
    if (n >= size) return `${(n / size).toFixed(n >= 10 * size ? 1 : 2)}${suffix}${unit}`;
  }
  return `${n}${unit ? " " + unit : ""}`;
};

// A checkpoint URL or path by its file name; the whole source is in the cell's tooltip.
const sourceName = (source) => source ? source.split(/[\\/]/).pop() : "";

function precisionCell(q) {
  if (!q) return element("td", {}, "FP32");
  const d = q.drift;
  const text = `INT8: top-1 agrees ${Math.round(d.top1_agreement * d.photos.length)}/${d.photos.length}, ` +
    `cosine ${d.logit_cosine_mean.toFixed(3)}`;
  return element("td", { class: q.note ? "warn" : "", title: q.note || q.method }, text);
}

function modelRow(m) {
  const meta = m.metadata || {};
  const shape = meta.input ? meta.input.shape : null;
  const weights = meta.weights || {};
  const random = weights.kind === "random";
  const statusCell = m.status === "failed"
    ? element("td", { class: "bad" }, "failed: ", m.error || "")
    : element("td", { class: `status-${m.status}` }, m.status);
  return element("tr", { "data-model": m.name },
    element("td", {}, element("b", {}, m.name)),
    element("td", {}, meta.architecture || "–"),
    precisionCell(meta.quantization),
    element("td", { class: "num" }, shape ? `${shape[2]}×${shape[3]}` : "–"),
    element("td", { class: "num" }, count(meta.params)),
    element("td", { class: "num" }, count(meta.macs)),
    element("td", { class: "num" }, meta.onnx ? count(meta.onnx.size_bytes, "B") : "–"),
    element("td", { class: random ? "warn" : "", title: weights.source || "" },
      random ? m.weights_note || "Random weights: predictions are meaningless." : `${weights.kind}: ${sourceName(weights.source)}`),
    element("td", { class: "small" }, m.preprocessing || "–"),  // the service's own one-line description
    statusCell);
}

async function loadModels() {
  const response = await call("/models");
  if (!response.ok) { notice(`Could not list the models: ${await failure(response)}`); return; }
  page.models = (await response.json()).models;
  $("#models tbody").replaceChildren(...page.models.map(modelRow));
  if (page.models.length === 0) $("#models tbody").replaceChildren(element("tr", {}, element("td", { colspan: 10 }, "No models in the repository.")));
  if (page.models.some((m) => m.status === "loading")) setTimeout(loadModels, 2000);
}

// --- try it ----------------------------------------------------------------------------------

function resultCard(model) {
  return element("article", { class: "card", "data-model": model.name },
    element("h3", {}, model.name), element("p", { class: "hint state" }, "waiting…"));
}

function showPrediction(card, body) {
  const list = element("ol", {}, ...body.predictions.map((p, i) => {
    const bar = element("span", { class: "bar" });
    bar.style.width = `${(p.probability * 100).toFixed(1)}%`;
    return element("li", { class: i === 0 ? "top1" : "", title: p.label, "data-class-id": p.class_id },
      bar, `${(p.probability * 100).toFixed(1)}% ${p.label}`);
  }));
  const seen = element("img", { src: body.input_image, alt: `what ${body.model} saw`,
    title: "what the model saw: resized and cropped" });
  const timings = element("div", { class: "timings" }, ...STAGES.map((stage) =>
    element("span", { "data-stage": stage }, element("b", {}, body.timings_ms[stage].toFixed(1)), stage)));
  card.querySelector(".state").replaceWith(element("div", { class: "seen" }, seen, list), timings,
    body.weights.note ? element("p", { class: "note warn" }, body.weights.note) : null);
}

function showError(card, message) {
  card.querySelector(".state").replaceWith(element("p", { class: "bad error" }, message));
}

// One /compare per photo: the service decodes it once and runs every model on it, one after
// another unless asked for all at once (their latencies then interfere).
async function compareAll(models, file, cards) {
  const form = new FormData();
  form.append("file", file);
  const names = models.map((m) => m.name).join(",");
  const sequential = $("#parallel").checked ? "" : "&sequential=true";
  let body;
  try {
    const response = await call(`/compare?models=${encodeURIComponent(names)}&top_k=5&input_image=true${sequential}`,
      { method: "POST", body: form });
    if (!response.ok) throw new Error(await failure(response));
    body = await response.json();
  } catch (error) {
    body = { results: {} };
    for (const m of models) body.results[m.name] = { error: error.message };
  }
  models.forEach((m, i) => {
    const entry = body.results[m.name] || { error: "no answer" };
    if (entry.predictions) showPrediction(cards[i], entry);
    else showError(cards[i], entry.code ? `${entry.error} (${entry.http_status} ${entry.code})` : entry.error);
    cards[i].dataset.done = "true";
  });
}

async function classify(file) {
  if (!file || !file.type.startsWith("image/")) { notice("That is not an image file."); return; }
  notice("");
  const photo = $("#photo-image");
  if (photo.src.startsWith("blob:")) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
  $("#photo-caption").textContent = `${file.name || "pasted image"}, ${count(file.size, "B")}`;
  $("#photo").hidden = false;
  const ready = page.models.filter((m) => m.status === "ready");
  if (ready.length === 0) { notice("No model is ready yet."); return; }
  const cards = ready.map(resultCard);
  $("#results").replaceChildren(...cards);
  await compareAll(ready, file, cards);
  refreshLatency();
}

function wireInputs() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (event) => classify(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) classify(item.getAsFile());
  });
}

// --- live latency ----------------------------------------------------------------------------

const triple = (s) => s ? `${s.p50.toFixed(1)} / ${s.p95.toFixed(1)} / ${s.p99.toFixed(1)}` : "–";

function meanBatch(sizes) {
  let runs = 0, images = 0;
  for (const [size, n] of Object.entries(sizes || {})) { runs += n; images += Number(size) * n; }
  return runs ? (images / runs).toFixed(2) : "–";
}

function latencyRow(name, s) {
  return element("tr", { "data-model": name },
    element("td", {}, element("b", {}, name)),
    element("td", { class: "num" }, String(s.requests)),
    element("td", { class: "num" }, String(s.statuses["503"] || 0)),
    element("td", { class: "num" }, String(s.errors)),
    element("td", { class: "num" }, s.throughput_rps === null ? "–" : s.throughput_rps.toFixed(1)),
    element("td", { class: "num" }, triple(s.stages_ms.total)),
    element("td", { class: "num" }, triple(s.stages_ms.inference)),
    element("td", { class: "num" }, meanBatch(s.batch_sizes)));
}

const colour = (i, n) => `hsl(${Math.round((360 * i) / Math.max(n, 1))}, 65%, 42%)`;
const chartWidth = (id) => Math.max(260, document.getElementById(id).clientWidth);

function drawTimeChart(names) {
  const { t, p50 } = page.history;
  const data = [t, ...names.map((n) => p50[n])];
  const chart = page.charts.time;
  if (chart && chart.series.length === names.length + 1) { chart.setData(data); return; }
  if (chart) chart.destroy();
  page.charts.time = new uPlot({
    width: chartWidth("chart-time"), height: 260,
    scales: { x: { time: true } },
    axes: [{}, { label: "ms", size: 50 }],
    series: [{}, ...names.map((n, i) => ({ label: n, stroke: colour(i, names.length), width: 2, spanGaps: true }))],
  }, data, document.getElementById("chart-time"));
}

function labelPoints(names) {
  return (u) => {
    const ctx = u.ctx, ratio = window.devicePixelRatio || 1;
    ctx.save();
    ctx.font = `${11 * ratio}px system-ui, sans-serif`;
    ctx.fillStyle = "#1d232a";
    u.data[0].forEach((x, i) => {
      const y = u.data[1][i];
      if (y === null) return;
      ctx.fillText(names[i], u.valToPos(x, "x", true) + 6 * ratio, u.valToPos(y, "y", true) - 6 * ratio);
    });
    ctx.restore();
  };
}

function drawTradeOff(summary) {
  // One point per model with MACs and a measured p50: the papers' plot, from this machine.
  const points = page.models
    .filter((m) => m.metadata && m.metadata.macs && summary.models[m.name] && summary.models[m.name].stages_ms.total)
    .map((m) => ({ name: m.name, macs: m.metadata.macs / 1e6, ms: summary.models[m.name].stages_ms.total.p50 }))
    .sort((a, b) => a.macs - b.macs);
  const names = points.map((p) => p.name);
  const data = [points.map((p) => p.macs), points.map((p) => p.ms)];
  if (page.charts.macs) page.charts.macs.destroy();
  page.charts.macs = new uPlot({
    width: chartWidth("chart-macs"), height: 260, legend: { show: false },
    scales: { x: { time: false, distr: 3 } },
    axes: [{ label: "MACs (millions, log scale)" }, { label: "ms", size: 50 }],
    series: [{}, { label: "total p50", stroke: "#2364aa", fill: "#2364aa", paths: () => null,
      points: { show: true, size: 9, fill: "#2364aa" } }],
    hooks: { draw: [labelPoints(names)] },
  }, data, document.getElementById("chart-macs"));
}

async function refreshLatency() {
  let summary;
  try {
    const response = await call("/metrics?format=json");
    if (!response.ok) throw new Error(await failure(response));
    summary = await response.json();
  } catch (error) {
    notice(`Could not read /metrics: ${error.message}`);
    return;
  }
  page.summary = summary;
  $("#rss").textContent = count(summary.process_rss_bytes, "B");
  const names = Object.keys(summary.models).filter((n) => !n.startsWith("_")).sort();
  if (names.length) $("#latency tbody").replaceChildren(...names.map((n) => latencyRow(n, summary.models[n])));
  const { t, p50 } = page.history;
  t.push(Date.now() / 1000);
  for (const n of names) {
    if (!p50[n]) p50[n] = t.slice(1).map(() => null);
    const total = summary.models[n].stages_ms.total;
    p50[n].push(total ? total.p50 : null);
  }
  if (t.length > HISTORY) { t.shift(); for (const n of names) p50[n].shift(); }
  drawTimeChart(names);
  drawTradeOff(summary);
}

window.addEventListener("resize", () => {
  for (const [name, chart] of Object.entries(page.charts)) {
    chart.setSize({ width: chartWidth(`chart-${name}`), height: 260 });
  }
});

wireInputs();
loadModels().then(refreshLatency);
setInterval(refreshLatency, REFRESH_MS);
