/* The message bar, and the sentences it says for API errors. */
import { HttpError } from "./api.js";
import { ui } from "./dom.js";
import { clause } from "./util.js";

export function showMessage(text, kind) {
  ui.messageText.textContent = text;
  ui.message.classList.toggle("info", kind === "info");
  ui.message.hidden = false;
}

export function clearMessage() {
  ui.message.hidden = true;
  ui.messageText.textContent = "";
}

/** A clear, actionable sentence for an error from the API while doing `action`. */
export function describeError(err, action) {
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

export function initMessages() {
  ui.messageClose.addEventListener("click", clearMessage);
}
