/* The axial slice view: slice PNGs fetched with the token and cached as blob: URLs, the
 * controls around the image (slider, window presets, overlay and Grad-CAM toggles, corner
 * labels), and navigation by slider, wheel, keys and the probability curve. */
import { api, jobPath } from "./api.js";
import { curveSliceAt, moveCurveCursor } from "./curve.js";
import { $, ui } from "./dom.js";
import { describeError, showMessage } from "./messages.js";
import { state } from "./state.js";
import { clamp, isNum } from "./util.js";

const CACHE_LIMIT = 64; // slice PNGs kept as blob URLs (a few MB at most)
const PREFETCH = [1, -1, 2, -2]; // neighbours fetched after the current slice shows
const WHEEL_STEP = 50; // accumulated wheel delta per slice (trackpads send small deltas)
const WINDOW_NAMES = { lung: "Lung", mediastinal: "Mediastinal", bone: "Bone" };

const cache = new Map(); // key -> {promise, url, evicted}; Map order = least recently used first

/** Drop every cached slice (a new study, or none). */
export function clearCache() {
  for (const entry of cache.values()) {
    entry.evicted = true;
    if (entry.url) URL.revokeObjectURL(entry.url);
  }
  cache.clear();
  state.displayedKey = null;
}

function camOn(z) {
  return state.cam && state.camSlices.has(z);
}

function sliceOptions(z) {
  return { window: state.window, overlay: state.overlay ? 1 : 0, cam: camOn(z) ? 1 : 0 };
}

/** The cache key, also set as the <img>'s data-key (the viewer test waits for it). */
function sliceKey(z, o) {
  return `${state.jobId}|${z}|${o.window}|${o.overlay}|${o.cam}`;
}

function getSlice(z, o) {
  const key = sliceKey(z, o);
  const hit = cache.get(key);
  if (hit) {
    cache.delete(key); // re-insert: most recently used
    cache.set(key, hit);
    return hit.promise;
  }
  const query = new URLSearchParams({ window: o.window, overlay: String(o.overlay), cam: String(o.cam) });
  const entry = { url: null, evicted: false, promise: null };
  entry.promise = api(`${jobPath(state.jobId)}/slices/${z}.png?${query}`)
    .then((response) => response.blob())
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      if (entry.evicted) URL.revokeObjectURL(url);
      else entry.url = url;
      return url;
    });
  entry.promise.catch(() => {
    if (cache.get(key) === entry) cache.delete(key); // let a later attempt retry
  });
  cache.set(key, entry);
  evict();
  return entry.promise;
}

function evict() {
  for (const [key, entry] of cache) {
    if (cache.size <= CACHE_LIMIT) break;
    if (key === state.displayedKey) continue; // the <img> still shows it
    entry.evicted = true;
    if (entry.url) URL.revokeObjectURL(entry.url);
    cache.delete(key);
  }
}

async function prefetch(z, seq) {
  for (const d of PREFETCH) {
    const zz = z + d;
    if (seq !== state.sliceSeq) return; // the reader moved on: prefetch around the new slice
    if (zz < 0 || zz >= state.nSlices) continue;
    try {
      await getSlice(zz, sliceOptions(zz));
    } catch (_) {
      return;
    }
  }
}

function describeSlice(z) {
  const o = sliceOptions(z);
  return `Axial CT slice ${z} of 0 to ${state.nSlices - 1}, ${WINDOW_NAMES[o.window]} window, `
    + `tumour overlay ${o.overlay ? "on" : "off"}, Grad-CAM ${o.cam ? "on" : "off"}`;
}

function updateControls() {
  const z = state.z;
  const r = state.result;
  ui.slider.value = String(z);
  const text = `Slice ${z} / ${Math.max(0, state.nSlices - 1)}`;
  ui.sliceNumber.textContent = text;
  ui.slider.setAttribute("aria-valuetext", `slice ${z} of 0 to ${state.nSlices - 1}`);
  const available = state.camSlices.has(z);
  ui.cam.disabled = !available;
  ui.cam.checked = camOn(z);
  ui.camLabel.classList.toggle("disabled", !available);
  ui.camLabel.title = available ? "Grad-CAM heat map (key C)"
    : "Grad-CAM is computed only for the most suspicious slices";
  for (const row of ui.lesionRows.children) {
    row.classList.toggle("on-slice", z >= Number(row.dataset.first) && z <= Number(row.dataset.last));
  }
  for (const b of ui.camHint.querySelectorAll("button")) {
    b.setAttribute("aria-current", String(Number(b.dataset.z) === z));
  }
  moveCurveCursor();
  const p = r && r.slice_probabilities ? r.slice_probabilities[z] : null;
  ui.cornerTL.textContent = `${WINDOW_NAMES[state.window]} window\n`
    + `${state.overlay ? "tumour overlay" : "no overlay"}${camOn(z) ? " · Grad-CAM" : ""}`;
  ui.cornerTR.textContent = `${text}\np(slice) ${isNum(p) ? p.toFixed(3) : "n/a (no lung)"}`;
}

/** The "on slices 3 4 5" buttons next to the Grad-CAM toggle. */
export function renderCamHint() {
  ui.camHint.replaceChildren();
  const slices = [...state.camSlices].sort((a, b) => a - b);
  if (!slices.length) {
    ui.camHint.textContent = state.result ? "no heat maps for this study" : "";
    return;
  }
  ui.camHint.append("on slices ");
  for (const z of slices) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "btn btn-ghost small";
    b.dataset.z = String(z);
    b.textContent = String(z);
    b.setAttribute("aria-label", `Go to Grad-CAM slice ${z}`);
    b.addEventListener("click", () => showSlice(z));
    ui.camHint.append(b);
  }
}

/** Show slice z with the current settings (cached, late answers ignored, neighbours prefetched). */
export function showSlice(zRequested) {
  if (!state.result || state.nSlices < 1) return;
  const z = clamp(Math.round(zRequested), 0, state.nSlices - 1);
  state.z = z;
  updateControls();
  const o = sliceOptions(z);
  const key = sliceKey(z, o);
  const seq = ++state.sliceSeq;
  const slow = setTimeout(() => { if (seq === state.sliceSeq) ui.loading.hidden = false; }, 150);
  getSlice(z, o).then((url) => {
    if (seq !== state.sliceSeq) return;
    clearTimeout(slow);
    ui.loading.hidden = true;
    ui.image.src = url;
    ui.image.alt = describeSlice(z);
    ui.image.dataset.key = key;
    ui.image.hidden = false;
    ui.stage.classList.add("has-image");
    state.displayedKey = key;
    prefetch(z, seq);
  }).catch((err) => {
    if (seq !== state.sliceSeq) return;
    clearTimeout(slow);
    ui.loading.hidden = true;
    showMessage(describeError(err, `Loading slice ${z}`));
  });
}

function setWindow(name) {
  const radio = $(`window-${name}`);
  if (!radio) return;
  radio.checked = true;
  radio.dispatchEvent(new Event("change"));
}

/** Keys: arrows and PageUp/PageDown move, Home/End jump, 1-3 windows, O overlay, C Grad-CAM. */
function onKey(e) {
  if (ui.tokenDialog.open || !state.result || e.altKey || e.ctrlKey || e.metaKey) return;
  const t = e.target;
  // Text fields keep their keys; the slider handles its own arrows (native range input).
  if (t instanceof HTMLInputElement && t.type !== "checkbox" && t.type !== "radio") return;
  if (t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement) return;
  if (t instanceof HTMLInputElement && t.type === "radio" && e.key.startsWith("Arrow")) return;
  const moves = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, PageUp: -10, PageDown: 10 };
  if (e.key in moves) {
    e.preventDefault();
    showSlice(state.z + moves[e.key]);
  } else if (e.key === "Home" || e.key === "End") {
    e.preventDefault();
    showSlice(e.key === "Home" ? 0 : state.nSlices - 1);
  } else if (e.key === "1" || e.key === "2" || e.key === "3") {
    setWindow(["lung", "mediastinal", "bone"][Number(e.key) - 1]);
  } else if (e.key === "o" || e.key === "O") {
    ui.overlay.click();
  } else if ((e.key === "c" || e.key === "C") && !ui.cam.disabled) {
    ui.cam.click();
  }
}

export function initSliceView() {
  ui.slider.addEventListener("input", () => showSlice(Number(ui.slider.value)));

  for (const radio of document.querySelectorAll('input[name="window"]')) {
    radio.addEventListener("change", () => {
      if (!radio.checked) return;
      state.window = radio.value;
      showSlice(state.z);
    });
  }
  ui.overlay.addEventListener("change", () => {
    state.overlay = ui.overlay.checked;
    showSlice(state.z);
  });
  ui.cam.addEventListener("change", () => {
    state.cam = ui.cam.checked;
    showSlice(state.z);
  });

  ui.stage.addEventListener("wheel", (e) => {
    if (!state.result) return;
    e.preventDefault();
    state.wheel += e.deltaY;
    if (Math.abs(state.wheel) < WHEEL_STEP && Math.abs(e.deltaY) < WHEEL_STEP) return;
    const step = Math.sign(state.wheel);
    state.wheel = 0;
    showSlice(state.z + step);
  }, { passive: false });

  ui.curve.addEventListener("click", (e) => {
    if (!state.result || state.nSlices < 1) return;
    showSlice(curveSliceAt(e.clientX));
  });

  document.addEventListener("keydown", onKey);
}
