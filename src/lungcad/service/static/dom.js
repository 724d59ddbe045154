/* The page's elements, looked up once (module scripts run after the document is parsed). */

export const $ = (id) => document.getElementById(id);

export const ui = {
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
  curveXLast: $("curve-x-last"), studyMeta: $("study-meta"), studyWarnings: $("study-warnings"),
  lesionPanel: $("lesion-panel"), lesionHeading: $("lesion-heading"), lesionRows: $("lesion-rows"),
  lesionEmpty: $("lesion-empty"),
  downloadPanel: $("download-panel"), recentPanel: $("recent-panel"), recentJobs: $("recent-jobs"),
};

/** An SVG element with these attributes. */
export function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}
