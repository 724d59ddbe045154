/* What the viewer shows now: one object shared by the modules (they change it in place). */

/** sessionStorage key of the access token (this browser tab only). */
export const TOKEN_KEY = "lungcad.token";

export const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  jobId: null,
  result: null, // the job's result document (GET .../result)
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
