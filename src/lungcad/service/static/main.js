/* lungcad web viewer, entry point: plain browser ES modules, no build step, nothing fetched
 * from outside the service.
 *
 * Talks to the REST API of lungcad.service.app; the modules, by concern:
 *   api.js         REST calls with the bearer token (fetch, and XHR for upload progress)
 *   session.js     sign-in dialog, token in sessionStorage (this tab only), model line
 *   upload.js      upload form and drag and drop
 *   jobs.js        polling a job, #job= in the URL, recent studies
 *   results.js     decision, lesion table, downloads
 *   slice_view.js  slice images (cached blob: URLs), display controls, navigation
 *   curve.js       slice-probability curve
 *   messages.js    message bar and error sentences
 *   dom.js, state.js, util.js  elements, shared state, small helpers
 */
import { onUnauthorized } from "./api.js";
import { ui } from "./dom.js";
import { restoreJob } from "./jobs.js";
import { initMessages } from "./messages.js";
import { initResults } from "./results.js";
import { initSession, requireSignIn, signIn } from "./session.js";
import { initSliceView } from "./slice_view.js";
import { state } from "./state.js";
import { initUpload } from "./upload.js";

onUnauthorized(requireSignIn); // any 401: the token is wrong or revoked, so ask again
initMessages();
initSession();
initUpload();
initResults();
initSliceView();

window.addEventListener("hashchange", () => {
  if (state.token) restoreJob();
});

if (state.token) {
  signIn(state.token).then((ok) => { if (!ok) requireSignIn(ui.tokenError.textContent || ""); });
} else {
  requireSignIn("");
}
