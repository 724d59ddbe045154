/* Signing in and out: the token dialog, the token check (GET model) and the model line. */
import { API, HttpError, apiJson } from "./api.js";
import { ui } from "./dom.js";
import { refreshRecent, restoreJob } from "./jobs.js";
import { clearMessage, describeError } from "./messages.js";
import { resetStudy } from "./results.js";
import { TOKEN_KEY, state } from "./state.js";
import { isNum } from "./util.js";

/** Forget the token and open the sign-in dialog, saying why (`reason`, may be empty). */
export function requireSignIn(reason) {
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

/** Check `token` against the service; on success keep it, show the model and reopen the job. */
export async function signIn(token) {
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

export function initSession() {
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
}
