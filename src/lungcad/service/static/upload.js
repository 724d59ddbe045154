/* Sending a study: the upload form, drag and drop onto the image, progress, then the job. */
import { postStudy } from "./api.js";
import { ui } from "./dom.js";
import { openJob, setJobStatus } from "./jobs.js";
import { clearMessage, describeError, showMessage } from "./messages.js";
import { resetStudy } from "./results.js";
import { requireSignIn } from "./session.js";
import { state } from "./state.js";

const STUDY_SUFFIXES = [".zip", ".nii", ".nii.gz"];

/** True for a file name this service reads (.zip of DICOM, .nii, .nii.gz). */
export function hasStudySuffix(name) {
  const lower = name.toLowerCase();
  return STUDY_SUFFIXES.some((s) => lower.endsWith(s));
}

/** Upload `file` and follow its job; errors are said in the message bar. */
export async function uploadStudy(file) {
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
    job = await postStudy(file, (pct) => {
      ui.uploadProgress.value = pct;
      ui.jobStatus.textContent = `Uploading ${file.name}: ${pct}%`;
    });
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

export function initUpload() {
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
}
