/* lungcad web viewer: plain browser JavaScript, no build step, nothing fetched from outside.
 *
 * Talks to the REST API of lungcad.service.app (see notes/interfaces.md, "Service"):
 * every /api call carries "Authorization: Bearer <token>"; the token lives in sessionStorage
 * (this tab only). Slice images, downloads and JSON all go through fetch() with that header,
 * so images become blob: URLs (an <img src> cannot send a header).
 */
"use strict";

(() => {
  const TOKEN_KEY = "lungcad.token";
  const API = "api/v1"; // relative: works when the app sits under a reverse-proxy sub-path
  const CACHE_LIMIT = 64; // slice PNGs kept as blob URLs (a few MB at most)
  const PREFETCH = [1, -1, 2, -2]; // neighbours fetched after the current slice shows
  const POLL_MIN_MS = 700;
  const POLL_MAX_MS = 3000;
  const WHEEL_STEP = 50; // accumulated wheel delta per slice (trackpads send small deltas)
  const WINDOW_NAMES = { lung: "Lung", mediastinal: "Mediastinal", bone: "Bone" };
  const STUDY_SUFFIXES = [".zip", ".nii", ".nii.gz"];

  const $ = (id) => document.getElementById(id);
  const ui = {
    message: $("message"), messageText: $("message-text"), messageClose: $("message-close"),
    modelInfo: $("model-info"), signOut: $("sign-out"), intendedUse: $("intended-use"),
    tokenDialog: $("token-dialog"), tokenForm: $("token-form"), tokenInput: $("token-input"),
    tokenError: $("token-error"),
    uploadForm: $("upload-form"), fileInput: $("file-input"), uploadButton: $("upload-button"),
    jobProgress: $("job-progress"), uploadProgress: $("upload-progress"), jobStatus: $("job-status"),
    stage: $("stage"), image: $("slice-image"), placeholder: $("stage-placeholder"),
    cornerTL: $("stage-corner-tl"), cornerTR: $("stage-corner-tr"), loading: $("stage-loading"),
    slider: $("slice-slider"), sliceNumber: $("slice-number"),
    overlay: $("overlay-toggle"), cam: $("cam-toggle"), camLabel: $("cam-label"),
    camHint: $("cam-hint"),
    resultPanel: $("result-panel"), studyProbability: $("study-probability"),
    decisionBadge: $("decision-badge"), threshold: $("threshold"), curve: $("prob-curve"),
    studyMeta: $("study-meta"), studyWarnings: $("study-warnings"),
    lesionPanel: $("lesion-panel"), lesionHeading: $("lesion-heading"), lesionRows: $("lesion-rows"), lesionEmpty: $("lesion-empty"),
    downloadPanel: $("download-panel"), recentPanel: $("recent-panel"), recentJobs: $("recent-jobs"),
  };

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    jobId: null,
    result: null,
    nSlices: 0,
    z: 0,
    window: "lung",
    overlay: true,
    cam: false, // the user's wish; shown only on slices that have a heat map
    camSlices: new Set(),
    pollSeq: 0, // bumping it stops a running poll loop
    sliceSeq: 0, // bumping it makes late slice responses ignored
    displayedKey: null,
    wheel: 0,
  };

  /** An HTTP error with the server's own explanation. */
  class HttpError extends Error {
    constructor(status, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
    }
  }

  // ------------------------------------------------------------------ helpers

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmt = (v, digits) => (isNum(v) ? v.toFixed(digits) : "–");

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function showMessage(text, kind) {
    ui.messageText.textContent = text;
    ui.message.classList.toggle("info", kind === "info");
    ui.message.hidden = false;
  }

  function clearMessage() {
    ui.message.hidden = true;
    ui.messageText.textContent = "";
  }

  /** The server's explanation from an error body: FastAPI's {"detail"}, or {"error"}, or text. */
  function detailFromBody(text) {
    if (!text) return "";
    try {
      const body = JSON.parse(text);
      const d = body.detail ?? body.error ?? body.message;
      if (typeof d === "string") return d;
      if (Array.isArray(d)) return d.map((e) => e.msg || JSON.stringify(e)).join("; ");
      if (d) return JSON.stringify(d);
    } catch (_) {
      // not JSON: fall through to the raw text
    }
    return text.length > 300 ? `${text.slice(0, 300)}…` : text;
  }

  /** The text without its final full stop, so it can be embedded in a sentence. */
  const clause = (text) => String(text).trim().replace(/[.\s]+$/, "");

  /** A clear, actionable sentence for an error from the API. */
  function describeError(err, action) {
    if (!(err instanceof HttpError)) {
      return `${action} failed: cannot reach the lungcad service (${clause(err.message)}). `
        + "Check the connection and that the service is running.";
    }
    const why = err.detail ? `: ${clause(err.detail)}` : "";
    switch (err.status) {
      case 401:
        return "Access denied (HTTP 401): the access token is missing or wrong. Sign in again.";
      case 413:
        return `The study is too large for this service (HTTP 413)${why}. Upload one series `
          + "only, or ask the administrator to raise the size limit.";
      case 400:
      case 415:
      case 422:
        return `The study could not be used (HTTP ${err.status})${why}.`;
      case 404:
        return `${action} failed: not found (HTTP 404)${why}.`;
      case 503:
        return `The service is busy or not ready (HTTP 503)${why}. Try again in a minute.`;
      default:
        return `${action} failed (HTTP ${err.status})${why}.`;
    }
  }

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    return headers;
  }

  /** fetch() with the bearer token; throws HttpError for non-2xx (and asks to sign in on 401). */
  async function api(path, options) {
    const opts = options || {};
    const response = await fetch(path, { ...opts, headers: authHeaders(opts.headers), cache: "no-store" });
    if (response.ok) return response;
    const detail = detailFromBody(await response.text().catch(() => ""));
    if (response.status === 401) requireSignIn("The access token was not accepted (HTTP 401).");
    throw new HttpError(response.status, detail);
  }

  const apiJson = async (path) => (await api(path)).json();
  const jobPath = (jobId) => `${API}/jobs/${encodeURIComponent(jobId)}`;

  // ------------------------------------------------------------------ sign-in

  function requireSignIn(reason) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    state.pollSeq += 1; // stop polling: every further call would fail the same way
    ui.signOut.hidden = true;
    ui.modelInfo.textContent = "not signed in";
    ui.tokenError.textContent = reason || "";
    ui.tokenError.hidden = !reason;
    if (!ui.tokenDialog.open) ui.tokenDialog.showModal();
    ui.tokenInput.focus();
  }

  async function signIn(token) {
    state.token = token;
    let info;
    try {
      info = await apiJson(`${API}/model`);
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) return false; // dialog already says why
      ui.tokenError.textContent = describeError(err, "Sign-in");
      ui.tokenError.hidden = false;
      return false;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.tokenDialog.close();
    ui.tokenError.hidden = true;
    ui.signOut.hidden = false;
    showModelInfo(info);
    clearMessage();
    await refreshRecent();
    await restoreJob();
    return true;
  }

  function showModelInfo(info) {
    const name = info.model_name || info.name || "model";
    const version = info.lungcad_version ? ` · lungcad ${info.lungcad_version}` : "";
    ui.modelInfo.textContent = `${name}${version}`;
    const sha = info.checkpoint_sha256 ? `checkpoint ${String(info.checkpoint_sha256).slice(0, 12)}` : "";
    const thr = isNum(info.threshold) ? `threshold ${info.threshold.toFixed(3)}` : "";
    ui.modelInfo.title = [sha, thr, info.config_hash ? `config ${info.config_hash}` : ""]
      .filter(Boolean).join(" · ");
    if (info.intended_use) ui.intendedUse.textContent = info.intended_use;
  }

  ui.tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault(); // keep the dialog open until the token is checked
    const token = ui.tokenInput.value.trim();
    if (!token) {
      ui.tokenError.textContent = "Enter the access token.";
      ui.tokenError.hidden = false;
      return;
    }
    await signIn(token);
  });

  ui.tokenDialog.addEventListener("cancel", (event) => event.preventDefault()); // no API without it

  ui.signOut.addEventListener("click", () => {
    resetStudy();
    history.replaceState(null, "", location.pathname);
    ui.tokenInput.value = "";
    requireSignIn("");
  });

  ui.messageClose.addEventListener("click", clearMessage);

  // ------------------------------------------------------------------ upload and jobs

  function hasStudySuffix(name) {
    const lower = name.toLowerCase();
    return STUDY_SUFFIXES.some((s) => lower.endsWith(s));
  }

  /** POST the file with XMLHttpRequest (fetch cannot report upload progress). */
  function postStudy(file) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `${API}/studies`);
      if (state.token) xhr.setRequestHeader("Authorization", `Bearer ${state.token}`);
      xhr.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable) {
          const pct = Math.round((100 * e.loaded) / e.total);
          ui.uploadProgress.value = pct;
          ui.jobStatus.textContent = `Uploading ${file.name}: ${pct}%`;
        }
      });
      xhr.addEventListener("load", () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          try {
            resolve(JSON.parse(xhr.responseText));
          } catch (_) {
            reject(new HttpError(xhr.status, "the server's answer was not JSON"));
          }
          return;
        }
        if (xhr.status === 401) requireSignIn("The access token was not accepted (HTTP 401).");
        reject(new HttpError(xhr.status, detailFromBody(xhr.responseText)));
      });
      xhr.addEventListener("error", () => reject(new Error(
        "the connection closed during the upload (a server closes it when a study is over its size limit)")));
      const form = new FormData();
      form.append("file", file, file.name);
      xhr.send(form);
    });
  }

  function setJobStatus(text, failed) {
    ui.jobProgress.hidden = false;
    ui.jobStatus.textContent = text;
    ui.jobStatus.classList.toggle("failed", Boolean(failed));
  }

  async function uploadStudy(file) {
    clearMessage();
    if (!state.token) {
      requireSignIn("Sign in before uploading a study.");
      return;
    }
    if (!hasStudySuffix(file.name)) {
      showMessage(`"${file.name}" is not a study this service reads: upload a DICOM series as `
        + "a .zip file, or a NIfTI volume (.nii or .nii.gz).");
      return;
    }
    ui.uploadButton.disabled = true;
    ui.uploadProgress.value = 0;
    setJobStatus(`Uploading ${file.name}…`);
    let job;
    try {
      job = await postStudy(file);
    } catch (err) {
      setJobStatus("Upload failed.", true);
      ui.uploadProgress.value = 0;
      showMessage(describeError(err, "Upload"));
      return;
    } finally {
      ui.uploadButton.disabled = false;
    }
    resetStudy();
    openJob(job.job_id);
  }

  ui.uploadForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = ui.fileInput.files && ui.fileInput.files[0];
    if (!file) {
      showMessage("Choose a study file first: a DICOM series as .zip, or a .nii / .nii.gz volume.");
      return;
    }
    uploadStudy(file);
  });

  // Drop a study onto the image area.
  ui.stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    ui.stage.classList.add("dragover");
  });
  ui.stage.addEventListener("dragleave", () => ui.stage.classList.remove("dragover"));
  ui.stage.addEventListener("drop", (e) => {
    e.preventDefault();
    ui.stage.classList.remove("dragover");
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) {
      ui.fileInput.files = files;
      uploadStudy(files[0]);
    }
  });

  function elapsed(job) {
    const from = Date.parse(job.started_at || job.created_at || "");
    const to = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    return Number.isFinite(from) && Number.isFinite(to) ? Math.max(0, (to - from) / 1000) : null;
  }

  /** Follow a job until it is done (then show it) or failed (then say why). */
  async function openJob(jobId) {
    state.jobId = jobId;
    history.replaceState(null, "", `#job=${encodeURIComponent(jobId)}`);
    const seq = ++state.pollSeq;
    let delay = POLL_MIN_MS;
    ui.uploadProgress.removeAttribute("value"); // indeterminate while the server works
    setJobStatus("Waiting for the server…");
    while (seq === state.pollSeq) {
      let job;
      try {
        job = await apiJson(jobPath(jobId));
      } catch (err) {
        if (seq !== state.pollSeq) return;
        setJobStatus("Could not get the job status.", true);
        showMessage(describeError(err, "Job status"));
        return;
      }
      if (seq !== state.pollSeq) return;
      const secs = elapsed(job);
      const took = secs === null ? "" : ` ${secs.toFixed(0)} s`;
      if (job.status === "done") {
        ui.uploadProgress.value = 100;
        setJobStatus(`Done${secs === null ? "" : ` in ${secs.toFixed(1)} s`} · job ${jobId}`);
        await loadResult(jobId, seq);
        refreshRecent();
        return;
      }
      if (job.status === "failed") {
        ui.uploadProgress.value = 0;
        setJobStatus(`Failed · job ${jobId}`, true);
        showMessage(`The analysis failed: ${clause(job.error || "the server gave no reason")}. `
          + "Check that the upload is one chest CT series.");
        refreshRecent();
        return;
      }
      setJobStatus(job.status === "running" ? `Analysing…${took}` : "Queued: waiting for a free worker…");
      await sleep(delay);
      delay = Math.min(POLL_MAX_MS, delay * 1.3);
    }
  }

  async function restoreJob() {
    const match = /job=([^&]+)/.exec(location.hash);
    const jobId = match ? decodeURIComponent(match[1]) : state.jobId;
    if (jobId && jobId !== (state.result && state.jobId)) openJob(jobId);
  }

  async function refreshRecent() {
    let jobs;
    try {
      const body = await apiJson(`${API}/jobs`);
      jobs = Array.isArray(body) ? body : body.jobs || [];
    } catch (_) {
      return; // the list is a convenience; its failure must not hide the real work
    }
    jobs = jobs.slice().sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)))
      .slice(0, 6);
    ui.recentJobs.replaceChildren();
    for (const job of jobs) {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      const when = Date.parse(job.created_at || "");
      const time = Number.isFinite(when) ? new Date(when).toLocaleString() : "";
      open.textContent = job.filename || job.name || `job ${String(job.job_id).slice(0, 8)}`;
      open.title = `Open job ${job.job_id}`;
      open.addEventListener("click", () => {
        resetStudy();
        openJob(job.job_id);
      });
      const status = document.createElement("span");
      status.className = `muted st-${job.status}`;
      status.textContent = `${job.status}${time ? ` · ${time}` : ""}`;
      li.append(open, status);
      ui.recentJobs.append(li);
    }
    ui.recentPanel.hidden = jobs.length === 0;
  }

  // ------------------------------------------------------------------ result

  function resetStudy() {
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

  function firstSlice(r) {
    // Start where the reader should look: the largest lesion's widest slice, else the most
    // suspicious slice, else the middle.
    const lesion = (r.lesions || [])[0];
    if (lesion) return lesionSlice(lesion);
    let best = -1;
    let at = Math.floor(state.nSlices / 2);
    (r.slice_probabilities || []).forEach((p, z) => {
      if (isNum(p) && p > best) { best = p; at = z; }
    });
    return at;
  }

  function lesionSlice(lesion) {
    if (Number.isInteger(lesion.diameter_slice)) return lesion.diameter_slice;
    if (Array.isArray(lesion.slice_range)) return Math.round((lesion.slice_range[0] + lesion.slice_range[1]) / 2);
    if (Array.isArray(lesion.centroid_zyx)) return Math.round(lesion.centroid_zyx[0]);
    return 0;
  }

  async function loadResult(jobId, seq) {
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
    ui.studyProbability.textContent = fmt(r.study_probability, 3);
    const positive = Boolean(r.is_cancer);
    ui.decisionBadge.textContent = positive ? "Suspicious for cancer" : "Not suspicious";
    ui.decisionBadge.className = `badge ${positive ? "pos" : "neg"}`;
    ui.threshold.textContent = `${positive ? "at or above" : "below"} threshold ${fmt(r.threshold, 3)}`;
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

  function filenameFrom(response, url) {
    const cd = response.headers.get("Content-Disposition") || "";
    const star = /filename\*=UTF-8''([^;]+)/i.exec(cd);
    if (star) return decodeURIComponent(star[1]);
    const plain = /filename="?([^";]+)"?/i.exec(cd);
    if (plain) return plain[1];
    return decodeURIComponent(url.split("?")[0].split("/").pop() || "download");
  }

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
      setTimeout(() => URL.revokeObjectURL(href), 30000);
    } catch (err) {
      showMessage(describeError(err, `Downloading ${button.textContent}`));
    } finally {
      button.disabled = false;
    }
  }

  for (const button of ui.downloadPanel.querySelectorAll("button[data-file]")) {
    button.addEventListener("click", () => download(button));
  }

  // ------------------------------------------------------------------ probability curve

  function drawCurve() {
    const r = state.result;
    const node = ui.curve;
    node.replaceChildren();
    if (!r) return;
    const W = 320;
    const H = 90;
    const pad = 4;
    const n = Math.max(1, state.nSlices);
    const x = (z) => (n > 1 ? (z / (n - 1)) * W : W / 2);
    const y = (p) => H - pad - p * (H - 2 * pad);
    // Slices holding any lesion, shaded (one band per run of such slices, so many
    // overlapping lesions do not stack up to an opaque block).
    const covered = new Set();
    for (const lesion of r.lesions || []) {
      if (!Array.isArray(lesion.slice_range)) continue;
      for (let z = lesion.slice_range[0]; z <= lesion.slice_range[1]; z += 1) covered.add(z);
    }
    for (let z = 0; z < n; z += 1) {
      if (!covered.has(z) || covered.has(z - 1)) continue;
      let end = z;
      while (covered.has(end + 1)) end += 1;
      const x0 = n > 1 ? Math.max(0, x(z - 0.5)) : 0;
      const x1 = n > 1 ? Math.min(W, x(end + 0.5)) : W;
      node.append(svg("rect", { class: "lesion-band", x: x0, y: 0, width: Math.max(1, x1 - x0), height: H }));
    }
    // One polyline per run of evaluated slices (slices without lung have no probability).
    let run = [];
    const flush = () => {
      if (!run.length) return;
      const pts = run.map(([z, p]) => `${x(z).toFixed(2)},${y(p).toFixed(2)}`);
      if (run.length === 1) pts.push(`${(x(run[0][0]) + 1).toFixed(2)},${y(run[0][1]).toFixed(2)}`);
      const first = x(run[0][0]).toFixed(2);
      const last = x(run[run.length - 1][0]).toFixed(2);
      node.append(svg("polygon", { class: "area", points: `${first},${H} ${pts.join(" ")} ${last},${H}` }));
      node.append(svg("polyline", { class: "line", points: pts.join(" ") }));
      run = [];
    };
    (r.slice_probabilities || []).forEach((p, z) => {
      if (isNum(p)) run.push([z, p]);
      else flush();
    });
    flush();
    if (isNum(r.threshold)) { // on top: a flat curve at the threshold must not hide it
      node.append(svg("line", { class: "thr", x1: 0, x2: W, y1: y(r.threshold), y2: y(r.threshold) }));
    }
    $("curve-x-last").textContent = String(n - 1);
    for (const z of state.camSlices) {
      node.append(svg("line", { class: "cam-tick", x1: x(z), x2: x(z), y1: H - 6, y2: H }));
    }
    const cursor = svg("line", { class: "cursor", id: "curve-cursor", x1: x(state.z), x2: x(state.z), y1: 0, y2: H });
    node.append(cursor);
    const title = svg("title");
    title.textContent = "Slice cancer probability by slice; white line: current slice";
    node.append(title);
  }

  function moveCurveCursor() {
    const cursor = ui.curve.querySelector("#curve-cursor");
    if (!cursor) return;
    const n = Math.max(1, state.nSlices);
    const xz = n > 1 ? (state.z / (n - 1)) * 320 : 160;
    cursor.setAttribute("x1", String(xz));
    cursor.setAttribute("x2", String(xz));
  }

  ui.curve.addEventListener("click", (e) => {
    if (!state.result || state.nSlices < 1) return;
    const box = ui.curve.getBoundingClientRect();
    const frac = clamp((e.clientX - box.left) / box.width, 0, 1);
    showSlice(Math.round(frac * (state.nSlices - 1)));
  });

  // ------------------------------------------------------------------ slice images

  const cache = new Map(); // key -> {promise, url, evicted}; Map order = least recently used first

  function clearCache() {
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

  function renderCamHint() {
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
  function showSlice(zRequested) {
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

  function setWindow(name) {
    const radio = $(`window-${name}`);
    if (!radio) return;
    radio.checked = true;
    radio.dispatchEvent(new Event("change"));
  }

  document.addEventListener("keydown", (e) => {
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
  });

  // ------------------------------------------------------------------ start

  window.addEventListener("hashchange", () => {
    if (state.token) restoreJob();
  });

  if (state.token) {
    signIn(state.token).then((ok) => { if (!ok) requireSignIn(ui.tokenError.textContent || ""); });
  } else {
    requireSignIn("");
  }
})();
