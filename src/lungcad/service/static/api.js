/* The REST API of lungcad.service.app, as the viewer calls it.
 *
 * Every call carries "Authorization: Bearer <token>" (state.token). Slice images, downloads
 * and JSON all go through fetch() with that header, so images become blob: URLs (an <img src>
 * cannot send a header). No DOM here: a 401 is reported to the handler set with
 * onUnauthorized (main.js asks to sign in again).
 */
import { state } from "./state.js";

/** The API prefix, relative: it works when the app sits under a reverse-proxy sub-path.
 * Python's lungcad.service.jobs.schema.API_PREFIX without its leading slash. */
export const API = "api/v1";
const UNAUTHORIZED = "The access token was not accepted (HTTP 401).";

let unauthorizedHandler = () => {};

/** Call `handler(reason)` whenever the server answers 401. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

/** An HTTP error with the server's own explanation. */
export class HttpError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

/** The server's explanation from an error body: FastAPI's {"detail"}, or {"error"}, or text. */
export function detailFromBody(text) {
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

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  return headers;
}

/** fetch() with the bearer token; throws HttpError for non-2xx (and reports a 401). */
export async function api(path, options) {
  const opts = options || {};
  const response = await fetch(path, { ...opts, headers: authHeaders(opts.headers), cache: "no-store" });
  if (response.ok) return response;
  const detail = detailFromBody(await response.text().catch(() => ""));
  if (response.status === 401) unauthorizedHandler(UNAUTHORIZED);
  throw new HttpError(response.status, detail);
}

export const apiJson = async (path) => (await api(path)).json();
export const jobPath = (jobId) => `${API}/jobs/${encodeURIComponent(jobId)}`;

/** POST a study file with XMLHttpRequest (fetch cannot report upload progress).
 *
 * @param {File} file the study (.zip, .nii, .nii.gz).
 * @param {(percent: number) => void} onProgress called as the bytes go out (0..100).
 * @returns {Promise<object>} the 202 answer: {job_id, status}.
 */
export function postStudy(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${API}/studies`);
    if (state.token) xhr.setRequestHeader("Authorization", `Bearer ${state.token}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(Math.round((100 * e.loaded) / e.total));
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
      if (xhr.status === 401) unauthorizedHandler(UNAUTHORIZED);
      reject(new HttpError(xhr.status, detailFromBody(xhr.responseText)));
    });
    xhr.addEventListener("error", () => reject(new Error(
      "the connection closed during the upload (a server closes it when a study is over its size limit)")));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}
