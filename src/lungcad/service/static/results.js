/* A finished job's result: decision and probability, warnings, the lesion table, downloads;
 * loading it opens the slice view on the slice the reader should look at first. */
import { api, apiJson, jobPath } from "./api.js";
import { drawCurve } from "./curve.js";
import { ui } from "./dom.js";
import { describeError, showMessage } from "./messages.js";
import { clearCache, renderCamHint, showSlice } from "./slice_view.js";
import { state } from "./state.js";
import { fmt, isNum } from "./util.js";

const REVOKE_DOWNLOAD_MS = 30000; // the browser has read a downloaded blob by then

/** Show no study: stop polling, forget the result and hide its panels. */
export function resetStudy() {
  state.pollSeq += 1;
  state.sliceSeq += 1;
  state.result = null;
  state.jobId = null;
  state.nSlices = 0;
  state.camSlices = new Set();
  clearCache();
  ui.image.hidden = true;
  ui.image.removeAttribute("src");
  ui.stage.classList.remove("has-image");
  ui.placeholder.hidden = false;
  ui.slider.disabled = true;
  ui.sliceNumber.textContent = "Slice –";
  ui.resultPanel.hidden = true;
  ui.lesionPanel.hidden = true;
  ui.downloadPanel.hidden = true;
  ui.camHint.replaceChildren();
}

/** The slice a lesion is best seen on: its widest slice, else the middle of its range. */
export function lesionSlice(lesion) {
  if (Number.isInteger(lesion.diameter_slice)) return lesion.diameter_slice;
  if (Array.isArray(lesion.slice_range)) return Math.round((lesion.slice_range[0] + lesion.slice_range[1]) / 2);
  if (Array.isArray(lesion.centroid_zyx)) return Math.round(lesion.centroid_zyx[0]);
  return 0;
}

/** Where the reader should look first: the largest lesion's widest slice, else the most
 * suspicious slice, else the middle. */
export function firstSlice(r) {
  const lesion = (r.lesions || [])[0];
  if (lesion) return lesionSlice(lesion);
  let best = -1;
  let at = Math.floor(state.nSlices / 2);
  (r.slice_probabilities || []).forEach((p, z) => {
    if (isNum(p) && p > best) { best = p; at = z; }
  });
  return at;
}

/** Fetch and show a done job's result, unless the poll `seq` was superseded meanwhile. */
export async function loadResult(jobId, seq) {
  let r;
  try {
    r = await apiJson(`${jobPath(jobId)}/result`);
  } catch (err) {
    showMessage(describeError(err, "Loading the result"));
    return;
  }
  if (seq !== state.pollSeq) return;
  state.result = r;
  state.jobId = jobId;
  const probs = r.slice_probabilities || [];
  state.nSlices = Number.isInteger(r.n_slices) ? r.n_slices : probs.length;
  state.camSlices = new Set(r.cam_slices || []);
  clearCache();
  renderDecision(r);
  renderLesions(r.lesions || []);
  renderDownloads(r.files || {});
  renderCamHint();
  ui.slider.min = "0";
  ui.slider.max = String(Math.max(0, state.nSlices - 1));
  ui.slider.disabled = state.nSlices < 2;
  ui.placeholder.hidden = true;
  showSlice(firstSlice(r));
}

function renderDecision(r) {
  ui.resultPanel.hidden = false;
  if (isNum(r.study_probability)) {
    ui.studyProbability.textContent = fmt(r.study_probability, 3);
    const positive = Boolean(r.is_cancer);
    ui.decisionBadge.textContent = positive ? "Suspicious for cancer" : "Not suspicious";
    ui.decisionBadge.className = `badge ${positive ? "pos" : "neg"}`;
    ui.threshold.textContent = `${positive ? "at or above" : "below"} threshold ${fmt(r.threshold, 3)}`;
  } else {
    // No decision ("cannot assess", "no classifier"): no probability, and the reason why.
    const finding = r.finding || {};
    ui.studyProbability.textContent = "–";
    ui.decisionBadge.textContent = finding.status === "no classifier" ? "No classifier" : "Cannot assess";
    ui.decisionBadge.className = "badge";
    ui.threshold.textContent = String(finding.reason || "no decision");
  }
  const sp = Array.isArray(r.spacing_zyx) ? r.spacing_zyx.map((v) => fmt(v, 2)).join(" × ") : "";
  const evaluated = (r.slice_probabilities || []).filter(isNum).length;
  ui.studyMeta.textContent = `${state.nSlices} slices (${evaluated} with lung evaluated)`
    + (sp ? ` · voxel ${sp} mm (z × y × x)` : "");
  const warnings = Array.isArray(r.warnings) ? r.warnings : [];
  ui.studyWarnings.replaceChildren(...warnings.map((w) => {
    const li = document.createElement("li");
    li.textContent = String(w);
    return li;
  }));
  ui.studyWarnings.hidden = warnings.length === 0;
  drawCurve();
}

function renderLesions(lesions) {
  ui.lesionPanel.hidden = false;
  ui.lesionRows.replaceChildren();
  ui.lesionEmpty.hidden = lesions.length > 0;
  ui.lesionHeading.textContent = `Lesions (${lesions.length})`;
  for (const lesion of lesions) {
    const tr = document.createElement("tr");
    const z = lesionSlice(lesion);
    tr.tabIndex = 0;
    tr.dataset.z = String(z);
    tr.dataset.first = String(Array.isArray(lesion.slice_range) ? lesion.slice_range[0] : z);
    tr.dataset.last = String(Array.isArray(lesion.slice_range) ? lesion.slice_range[1] : z);
    tr.setAttribute("aria-label", `Lesion ${lesion.id}: go to slice ${z}`);
    const range = Array.isArray(lesion.slice_range)
      ? `${lesion.slice_range[0]}–${lesion.slice_range[1]}` : String(z);
    const cells = [
      String(lesion.id ?? ""),
      fmt(lesion.volume_ml, lesion.volume_ml < 10 ? 2 : 1),
      fmt(lesion.longest_axial_diameter_mm, 1),
      range,
      fmt(lesion.mean_hu, 0),
      fmt(lesion.max_probability, 2),
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const go = () => {
      for (const row of ui.lesionRows.children) row.classList.toggle("selected", row === tr);
      showSlice(z);
    };
    tr.addEventListener("click", go);
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        go();
      }
    });
    ui.lesionRows.append(tr);
  }
}

function renderDownloads(files) {
  ui.downloadPanel.hidden = false;
  for (const button of ui.downloadPanel.querySelectorAll("button[data-file]")) {
    const url = files[button.dataset.file];
    button.disabled = !url;
    button.dataset.url = url || "";
    button.title = url ? `Download ${url.split("/").pop()}` : "Not available for this study";
  }
}

/** The file name a download is saved as: Content-Disposition's, else the URL's last part. */
export function filenameFrom(response, url) {
  const cd = response.headers.get("Content-Disposition") || "";
  const star = /filename\*=UTF-8''([^;]+)/i.exec(cd);
  if (star) return decodeURIComponent(star[1]);
  const plain = /filename="?([^";]+)"?/i.exec(cd);
  if (plain) return plain[1];
  return decodeURIComponent(url.split("?")[0].split("/").pop() || "download");
}

/** Download a result file through fetch (with the token) and a blob: link. */
async function download(button) {
  const url = button.dataset.url;
  if (!url) return;
  button.disabled = true;
  try {
    const response = await api(url);
    const blob = await response.blob();
    const href = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = href;
    a.download = filenameFrom(response, url);
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), REVOKE_DOWNLOAD_MS);
  } catch (err) {
    showMessage(describeError(err, `Downloading ${button.textContent}`));
  } finally {
    button.disabled = false;
  }
}

export function initResults() {
  for (const button of ui.downloadPanel.querySelectorAll("button[data-file]")) {
    button.addEventListener("click", () => download(button));
  }
}
