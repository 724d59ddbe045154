/* Following jobs: poll one until it is done or failed, reopen the one in the URL (#job=),
 * and the list of recent studies. */
import { API, apiJson, jobPath } from "./api.js";
import { ui } from "./dom.js";
import { describeError, showMessage } from "./messages.js";
import { loadResult, resetStudy } from "./results.js";
import { state } from "./state.js";
import { clause, sleep } from "./util.js";

const POLL_MIN_MS = 700;
const POLL_MAX_MS = 3000;
const RECENT_SHOWN = 6;

/** The status line under the upload form; `failed` colours it as an error. */
export function setJobStatus(text, failed) {
  ui.jobProgress.hidden = false;
  ui.jobStatus.textContent = text;
  ui.jobStatus.classList.toggle("failed", Boolean(failed));
}

/** Seconds the job has run (or ran), or null without usable times. */
function elapsed(job) {
  const from = Date.parse(job.started_at || job.created_at || "");
  const to = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return Number.isFinite(from) && Number.isFinite(to) ? Math.max(0, (to - from) / 1000) : null;
}

/** Follow a job until it is done (then show it) or failed (then say why). */
export async function openJob(jobId) {
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

/** Open the job named in the URL (#job=<id>), unless it is already shown. */
export async function restoreJob() {
  const match = /job=([^&]+)/.exec(location.hash);
  const jobId = match ? decodeURIComponent(match[1]) : state.jobId;
  if (jobId && jobId !== (state.result && state.jobId)) openJob(jobId);
}

/** Fill the "Recent studies" panel with the newest jobs (each opens on click). */
export async function refreshRecent() {
  let jobs;
  try {
    const body = await apiJson(`${API}/jobs`);
    jobs = Array.isArray(body) ? body : body.jobs || [];
  } catch (_) {
    return; // the list is a convenience; its failure must not hide the real work
  }
  jobs = jobs.slice().sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)))
    .slice(0, RECENT_SHOWN);
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
