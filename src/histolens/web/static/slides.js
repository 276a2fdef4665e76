"use strict";
// The slide viewer: the slide list, OpenSeadragon over the Deep Zoom tiles, the analysis job
// (start, poll), and its heatmap as an overlay layer with a toggle and an opacity slider.

const TOKEN_KEY = "histolens.token";
const POLL_MS = 500;
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", slide: null, overlay: null, poll: null };

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders() });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

const viewer = OpenSeadragon({
  id: "osd",
  prefixUrl: "/static/openseadragon/images/",
  showNavigator: true,
  maxZoomPixelRatio: 2,
  loadTilesWithAjax: Boolean(state.token),
  ajaxHeaders: authHeaders(),
  crossOriginPolicy: false,
});
window.histolensViewer = viewer;

function setOverlayState(text) {
  $("osd").dataset.overlay = text;
}
setOverlayState("none");

function opacity() {
  return $("overlay-toggle").checked ? Number($("opacity").value) / 100 : 0;
}

function applyOpacity() {
  $("opacity-value").textContent = `${$("opacity").value}%`;
  if (!state.overlay) return;
  state.overlay.setOpacity(opacity());
  setOverlayState($("overlay-toggle").checked ? "shown" : "hidden");
}

async function addOverlay(slideId) {
  const response = await api(`/v1/slides/${slideId}/heatmap.png`);
  const url = URL.createObjectURL(await response.blob());
  if (state.slide !== slideId) return;
  viewer.addTiledImage({
    tileSource: { type: "image", url, buildPyramid: false },
    x: 0, y: 0, width: 1,
    opacity: opacity(),
    success: (event) => {
      state.overlay = event.item;
      $("overlay-toggle").disabled = false;
      $("opacity").disabled = false;
      applyOpacity();
    },
  });
}

function showStatus(status) {
  const progress = $("progress");
  const text = $("analysis-text");
  const running = status.state === "queued" || status.state === "running";
  progress.hidden = !running;
  progress.value = status.progress;
  $("analyse").disabled = running || status.state === "done";
  if (running) {
    const total = status.tiles_total ? ` of ${status.tiles_total}` : "";
    text.textContent = status.state === "queued" ? "Queued…" : `Scoring tiles: ${status.tiles_done}${total}`;
  } else if (status.state === "done") {
    const s = status.summary || {};
    text.textContent = "Analysis done";
    $("legend-class").textContent = `P(${s.score_class || "score"}) 1`;
    const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));
    $("slide-summary").textContent =
      `${s.tiles_scored} tiles · mean ${fmt(s.score_mean)} · top-${s.top_k} ${fmt(s.score_topk_mean)} · max ${fmt(s.score_max)}`;
  } else if (status.state === "failed") {
    text.textContent = `Analysis failed: ${status.message}`;
    $("analyse").disabled = false;
  } else {
    text.textContent = "Not analysed yet";
  }
}

async function poll(slideId) {
  clearTimeout(state.poll);
  if (state.slide !== slideId) return;
  try {
    const status = await (await api(`/v1/slides/${slideId}/analysis`)).json();
    if (state.slide !== slideId) return;
    showStatus(status);
    if (status.state === "queued" || status.state === "running") {
      state.poll = setTimeout(() => poll(slideId), POLL_MS);
    } else if (status.state === "done" && !state.overlay && state.overlayFor !== slideId) {
      state.overlayFor = slideId;
      await addOverlay(slideId);
    }
  } catch (error) {
    $("slide-error").textContent = error.message;
  }
}

async function analyse() {
  const slideId = state.slide;
  $("analyse").disabled = true;
  try {
    showStatus(await (await api(`/v1/slides/${slideId}/analysis`, { method: "POST" })).json());
    poll(slideId);
  } catch (error) {
    $("slide-error").textContent = error.message;
    $("analyse").disabled = false;
  }
}

function openSlide(item, button) {
  document.querySelectorAll("#slides button").forEach((b) => b.classList.remove("active"));
  button.classList.add("active");
  state.slide = item.id;
  state.overlay = null;
  state.overlayFor = null;
  setOverlayState("none");
  $("overlay-toggle").disabled = true;
  $("opacity").disabled = true;
  $("slide-name").textContent = item.name;
  $("slide-summary").textContent = "";
  $("slide-error").textContent = "";
  $("osd").dataset.slide = item.id;
  viewer.open(`/v1/slides/${item.id}.dzi`);  // its "open" event polls the analysis
}

async function loadList() {
  try {
    const { slides } = await (await api("/v1/slides")).json();
    $("list-status").textContent = slides.length ? `${slides.length} slide(s)` : "No slides in the folder.";
    const list = $("slides");
    list.replaceChildren();
    for (const item of slides) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.id = item.id;
      button.title = item.relative_path;
      button.textContent = item.name;
      const badge = document.createElement("span");
      badge.className = "state";
      badge.textContent = item.analysis === "idle" ? "" : item.analysis;
      button.append(badge);
      button.addEventListener("click", () => openSlide(item, button));
      li.append(button);
      list.append(li);
    }
  } catch (error) {
    $("list-status").textContent =
      error.status === 401 ? "API token needed: set it on the main page." : error.message;
  }
}

$("analyse").addEventListener("click", analyse);
$("overlay-toggle").addEventListener("change", applyOpacity);
$("opacity").addEventListener("input", applyOpacity);
viewer.addHandler("open", () => { $("analyse").disabled = false; poll(state.slide); });
loadList();
