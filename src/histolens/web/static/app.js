// histolens web page: upload an image, show the prediction and a heatmap blended client-side.
// The heatmap is fetched once per image, method and magnification; the opacity slider only
// redraws the canvas.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "histolens.token";
const SLOW_METHODS = new Set(["scorecam", "lime", "kernelshap", "integrated_gradients"]);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  file: null,
  base: null,        // ImageBitmap or canvas holding the uploaded image
  heat: null,        // canvas holding the jet-coloured heatmap
  requestId: 0,      // ignores answers to requests that a newer upload has superseded
  model: null,
};

// --- API ----------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    if (response.status === 401) needToken(detail);
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

function formWith(file, fields = {}) {
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  // The magnification picks the calibration of the prediction set; empty: read from the name.
  const magnification = $("magnification").value;
  if (magnification) form.append("magnification", magnification);
  return form;
}

// --- model info ---------------------------------------------------------------------------------
function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits).replace(/\.?0+$/, "") || "0" : String(value);
}

// The names every histolens front end gives the estimate's figures, in display order.
const FIGURES = {
  roc_auc: "ROC AUC", patient_auc: "patient AUC", balanced_accuracy: "balanced accuracy",
  patient_recognition_rate: "patient recognition rate", sensitivity: "sensitivity",
  specificity: "specificity", macro_f1: "macro F1", accuracy: "accuracy",
};
const ALIASES = { auc: "roc_auc", patient_level_auc: "patient_auc" };
// What each magnification's row shows beside its AUC (histolens.evaluation.estimate's DECISION_KEYS).
const DECISION = ["sensitivity", "specificity", "balanced_accuracy", "refer_rate"];
const DECISION_NAMES = { ...FIGURES, refer_rate: "referral rate" };

function figure(value) { return value.toFixed(3); }

function ciText(ci) {
  return Array.isArray(ci) && ci.every((v) => typeof v === "number")
    ? `95% CI ${ci[0].toFixed(2)}–${ci[1].toFixed(2)}` : "";
}

function supportText(block) {
  const perClass = Object.entries(block.patients_per_class || {})
    .map(([c, n]) => `${n} ${c.replace(/_/g, " ")}`).join(", ");
  const patients = block.n_patients === null || block.n_patients === undefined ? "?" : block.n_patients;
  let text = `${patients} patients${perClass ? ` (${perClass})` : ""}`;
  if (typeof block.n_images === "number") text += ` · ${block.n_images} images`;
  return text;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
  }
  return tr;
}

// The figures of an older checkpoint, which stores a headline of its test split only.
function storedFigures(metrics) {
  let flat = metrics || {};
  const own = Object.keys(flat).some((k) => (FIGURES[k] || ALIASES[k]) && typeof flat[k] === "number");
  if (!own) {
    const nested = Object.values(flat).find((v) => v && typeof v === "object" && !Array.isArray(v));
    flat = nested || {};
  }
  const figures = {};
  for (const [key, value] of Object.entries(flat)) {
    const name = ALIASES[key] || key;
    if (FIGURES[name] && typeof value === "number") figures[name] = value;
  }
  return figures;
}

function showPerformance(info) {
  const est = info.estimate;
  const figures = est ? est.metrics : storedFigures(info.metrics);
  const keys = Object.keys(FIGURES).filter((k) => typeof figures[k] === "number");
  $("metrics-block").hidden = keys.length === 0;
  if (keys.length === 0) return;
  const ci = est ? est.ci95 : {};
  $("metrics-title").textContent = est ? "Performance on unseen patients" : "Measured performance";
  const main = keys.includes("roc_auc") ? "roc_auc" : keys.includes("balanced_accuracy") ? "balanced_accuracy" : keys[0];
  $("headline-figure").replaceChildren(
    Object.assign(document.createElement("b"), { textContent: figure(figures[main]) }),
    ` ${FIGURES[main]}`,
    Object.assign(document.createElement("span"), {
      className: "ci", textContent: ciText(ci[main]) || "no confidence interval stored",
    }),
  );
  $("metrics-about").textContent = est
    ? `${est.method}: ${est.description}.`
    : `Measured on ${info.metrics_description || "a test split"}.`;
  $("metrics-support").textContent = est ? `Patients behind these figures: ${supportText(est)}.` : "";
  $("metrics-support").hidden = !est;
  $("metrics-warnings").replaceChildren(...(info.metrics_warnings || []).map((w) => {
    const li = document.createElement("li");
    li.textContent = w;
    return li;
  }));
  $("metrics").replaceChildren(...keys.map((k) => row([
    [FIGURES[k]], [figure(figures[k]), "num"], [ciText(ci[k]).replace("95% CI ", ""), "ci"],
  ])));
  const mags = Object.entries((est && est.per_magnification) || {});
  $("per-mag").hidden = mags.length === 0;
  $("per-mag-table").replaceChildren(...mags.map(([mag, block]) => {
    const k = typeof block.metrics.roc_auc === "number" ? "roc_auc" : "balanced_accuracy";
    const value = typeof block.metrics[k] === "number"
      ? `${FIGURES[k]} ${figure(block.metrics[k])} ${ciText(block.ci95[k])}` : "n/a (one class only)";
    // The decision at this magnification's own operating point, beside its AUC.
    const decision = DECISION.filter((d) => typeof block.metrics[d] === "number")
      .map((d) => `${DECISION_NAMES[d]} ${figure(block.metrics[d])} ${ciText(block.ci95[d])}`);
    const at = typeof block.threshold === "number" ? `at threshold ${fmt(block.threshold)}: ` : "";
    const text = decision.length ? `${value}; ${at}${decision.join("; ")}` : value;
    return row([[mag], [`${text}; ${supportText(block)}`, "wide"]]);
  }));
}

async function loadModel() {
  try {
    const info = await (await api("/v1/model")).json();
    state.model = info;
    $("health-dot").className = "dot ok";
    $("model-chip-text").textContent = `${info.model_id} · ${info.backbone} · ${info.task}`;
    const facts = [
      ["Model", info.model_id], ["Backbone", info.backbone], ["Task", info.task],
      ["Classes", info.class_names.map((c) => c.replace(/_/g, " ")).join(", ")],
      ["Magnification", info.magnification ? (info.magnification === "all" ? "all" : `${info.magnification}×`) : "n/a"],
    ];
    if (info.threshold !== null) facts.push(["Threshold", fmt(info.threshold)]);
    facts.push(["Temperature", fmt(info.temperature)]);
    facts.push(["Licence", info.licence || "see the backbone's model card"]);
    if (info.runtime && info.runtime !== "torch") facts.push(["Runtime", `${info.runtime} (ONNX export)`]);
    if (info.saved_at) facts.push(["Saved", info.saved_at.replace("T", " ").replace("+00:00", " UTC")]);
    const dl = $("model-facts");
    dl.replaceChildren();
    for (const [k, v] of facts) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    showPerformance(info);
    fillMethods(info.explain_methods);
    if (info.auth_required && state.token) $("token-panel").classList.remove("needed");
  } catch (error) {
    $("health-dot").className = "dot bad";
    const status = error.status === 401 ? "API token needed" : "service unavailable";
    $("model-chip-text").textContent = status;
    const dt = document.createElement("dt"); dt.textContent = "Status";
    const dd = document.createElement("dd"); dd.textContent = status; dd.className = "muted";
    $("model-facts").replaceChildren(dt, dd);
    if (error.status !== 401) showError(error.message);
  }
}

function fillMethods(methods) {
  const select = $("method");
  const current = select.value || "gradcam";
  select.replaceChildren(...methods.map((m) => {
    const option = document.createElement("option");
    option.value = m;
    option.textContent = SLOW_METHODS.has(m) ? `${m} (slow)` : m;
    return option;
  }));
  select.disabled = methods.length === 0;
  if (methods.includes(current)) select.value = current;
}

function needToken(detail) {
  const panel = $("token-panel");
  panel.open = true;
  panel.classList.add("needed");
  $("token-help").textContent = detail;
  $("token").focus();
}

// --- drawing ------------------------------------------------------------------------------------
// OpenCV's COLORMAP_JET, as the server's overlays and the desktop app use.
function jet(v) {
  const c = (x) => Math.max(0, Math.min(1, x));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function heatmapCanvas(values, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(width, height);
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const [r, g, b] = jet(i / 255);
    lut[3 * i] = 255 * r; lut[3 * i + 1] = 255 * g; lut[3 * i + 2] = 255 * b;
  }
  for (let p = 0; p < values.length; p++) {
    const k = 3 * Math.max(0, Math.min(255, Math.round(values[p] * 255)));
    img.data[4 * p] = lut[k]; img.data[4 * p + 1] = lut[k + 1]; img.data[4 * p + 2] = lut[k + 2];
    img.data[4 * p + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

function decodeHeatmap(heatmap) {
  if (heatmap.encoding === "list") return Float32Array.from(heatmap.data.flat());
  const bytes = Uint8Array.from(atob(heatmap.data), (ch) => ch.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function draw() {
  if (!state.base) return;
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const alpha = Number($("alpha").value) / 100;
  $("alpha-value").textContent = `${Math.round(alpha * 100)}%`;
  canvas.width = state.base.width;
  canvas.height = state.base.height;
  ctx.globalAlpha = 1;
  ctx.drawImage(state.base, 0, 0);
  if (state.heat) {
    ctx.globalAlpha = alpha;
    ctx.drawImage(state.heat, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  canvas.dataset.alpha = alpha.toFixed(2);
}

// --- results ------------------------------------------------------------------------------------
function pct(p) { return `${(100 * p).toFixed(1)}%`; }

function showPrediction(pred) {
  $("result-empty").hidden = true;
  $("result").hidden = false;
  const binary = pred.threshold !== null && pred.positive_probability !== null;
  const label = $("label");
  label.textContent = pred.class.replace(/_/g, " ");
  label.className = "label " + (["benign", "malignant"].includes(pred.class) ? pred.class : "other");
  $("probability").textContent = pct(pred.probability);
  showFlag(pred);
  $("meter").hidden = !binary;
  $("meter-scale").hidden = !binary;
  if (binary) {
    const names = Object.keys(pred.scores);
    $("meter-fill").style.width = pct(pred.positive_probability);
    $("meter-threshold").style.left = pct(pred.threshold);
    $("threshold-text").textContent = `threshold ${fmt(pred.threshold, 2)}`;
    $("scale-left").textContent = names[0];
    $("scale-right").textContent = `${names[1]} ${pct(pred.positive_probability)}`;
  }
  const entries = Object.entries(pred.scores).sort((a, b) => b[1] - a[1]);
  $("scores").replaceChildren(...entries.map(([name, p], i) => {
    const li = document.createElement("li");
    li.className = (binary ? name : "") + (i === 0 ? " top" : "");
    li.innerHTML = '<span class="name"></span><span class="value"></span><span class="bar"><i></i></span>';
    li.querySelector(".name").textContent = name.replace(/_/g, " ");
    li.querySelector(".value").textContent = pct(p);
    li.querySelector(".bar i").style.width = pct(p);
    return li;
  }));
}

function sentence(text) { return text ? text[0].toUpperCase() + text.slice(1) : ""; }

// '{benign, malignant} at α=0.10': a conformal prediction set and its error level.
function setText(pred) {
  const a = pred.alpha;
  const level = Math.abs(Math.round(a * 100) - a * 100) < 1e-9 ? a.toFixed(2) : String(a);
  return `{${pred.prediction_set.join(", ")}} at α=${level}`;
}

// The flag and its reason: not like the training images, refer (several classes plausible at
// the set's error level) or, for models without a calibration, review needed.
function showFlag(pred) {
  const badge = $("review");
  const reason = $("flag-reason");
  const hasSet = pred.prediction_set && pred.prediction_set.length > 0 && pred.alpha !== null;
  $("prediction-set").hidden = !hasSet;
  $("prediction-set").textContent = hasSet ? `Prediction set ${setText(pred)}` : "";
  let flag = null;
  if (pred.ood) {
    flag = {
      cls: "ood", badge: "Not like the training images", reason: pred.ood_reason,
      title: "The image is not like the model's training images: its answer may mean nothing",
    };
  } else if (pred.refer) {
    flag = {
      cls: "review", badge: "Refer", reason: pred.refer_reason,
      title: "Several classes are plausible at this error level: a person should decide",
    };
  } else if (pred.uncertain) {
    flag = {
      cls: "review", badge: "Review needed", reason: null,
      title: "The probability is close to the decision threshold",
    };
  }
  badge.hidden = flag === null;
  reason.hidden = flag === null || !flag.reason;
  if (flag === null) return;
  badge.className = `badge ${flag.cls}`;
  badge.textContent = flag.badge;
  badge.title = flag.title;
  reason.className = `flag-reason ${flag.cls}`;
  reason.textContent = flag.reason ? `${sentence(flag.reason)}.` : "";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(on, text = "Computing heatmap…") {
  $("heatmap-busy").hidden = !on;
  $("busy-text").textContent = text;
}

// --- the flow -----------------------------------------------------------------------------------
async function baseImage(file) {
  try {
    return await createImageBitmap(file);
  } catch (_) {
    // The browser cannot decode it (TIFF, for example): ask the server for the image itself,
    // as an overlay with opacity 0.
    const response = await api("/v1/explain", { method: "POST", body: formWith(file, { alpha: "0" }) });
    return await createImageBitmap(await response.blob());
  }
}

async function explain() {
  if (!state.file || $("method").disabled) return;
  const id = state.requestId;
  const method = $("method").value;
  setBusy(true, SLOW_METHODS.has(method) ? `Computing ${method} (this can take a while)…` : `Computing ${method}…`);
  try {
    const response = await api("/v1/explain", {
      method: "POST", body: formWith(state.file, { method, format: "json", encoding: "base64" }),
    });
    const body = await response.json();
    if (id !== state.requestId) return;
    const values = decodeHeatmap(body.heatmap);
    state.heat = heatmapCanvas(values, body.heatmap.width, body.heatmap.height);
    $("canvas").dataset.method = body.method;
    $("heat-caption").textContent = `${body.method} heatmap for “${body.target_class.replace(/_/g, " ")}”`;
    draw();
  } catch (error) {
    if (id === state.requestId) showError(error.message);
  } finally {
    if (id === state.requestId) setBusy(false);
  }
}

async function handleFile(file) {
  if (!file) return;
  const id = ++state.requestId;
  state.file = file;
  state.heat = null;
  $("heat-caption").textContent = "";
  showError("");
  $("dropzone").hidden = true;
  $("stage").hidden = false;
  $("filename").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KB`;
  $("result").hidden = true;
  $("result-empty").hidden = false;
  $("result-empty").textContent = "Classifying…";
  setBusy(true, "Classifying…");
  try {
    const [base, pred] = await Promise.all([
      baseImage(file),
      api("/v1/predict", { method: "POST", body: formWith(file) }).then((r) => r.json()),
    ]);
    if (id !== state.requestId) return;
    state.base = base;
    draw();
    showPrediction(pred);
  } catch (error) {
    if (id !== state.requestId) return;
    setBusy(false);
    $("result-empty").textContent = "No prediction.";
    showError(error.message);
    if (!state.base) { $("stage").hidden = true; $("dropzone").hidden = false; }
    return;
  }
  await explain();
}

function setupDrop(target) {
  const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
  target.addEventListener("dragenter", (e) => { stop(e); target.classList.add("over"); });
  target.addEventListener("dragover", (e) => { stop(e); target.classList.add("over"); });
  target.addEventListener("dragleave", (e) => { stop(e); target.classList.remove("over"); });
  target.addEventListener("drop", (e) => {
    stop(e);
    target.classList.remove("over");
    handleFile(e.dataTransfer.files[0]);
  });
}

function init() {
  const input = $("file-input");
  const dropzone = $("dropzone");
  dropzone.addEventListener("click", () => input.click());
  dropzone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { handleFile(input.files[0]); input.value = ""; });
  $("replace").addEventListener("click", () => input.click());
  setupDrop(dropzone);
  setupDrop($("canvas-wrap"));
  $("alpha").addEventListener("input", draw);
  $("method").addEventListener("change", () => { state.requestId++; explain(); });
  $("magnification").addEventListener("change", () => { if (state.file) handleFile(state.file); });
  $("token").value = state.token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-help").textContent = "Saved for this tab.";
    loadModel();
  });
  fillMethods(["gradcam"]);
  loadModel();
}

init();
