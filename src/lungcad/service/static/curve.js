/* The slice-probability curve (SVG): one line per run of evaluated slices, lesion bands, the
 * threshold, Grad-CAM ticks and a cursor at the current slice. */
import { svg, ui } from "./dom.js";
import { clamp, isNum } from "./util.js";
import { state } from "./state.js";

const W = 320; // the SVG's viewBox width and height
const H = 90;
const PAD = 4;

/** x of slice z in the viewBox (slices spread over the width; one slice in the middle). */
function sliceX(z) {
  const n = Math.max(1, state.nSlices);
  return n > 1 ? (z / (n - 1)) * W : W / 2;
}

/** Draw the curve of state.result (empty without a result). */
export function drawCurve() {
  const r = state.result;
  const node = ui.curve;
  node.replaceChildren();
  if (!r) return;
  const n = Math.max(1, state.nSlices);
  const x = sliceX;
  const y = (p) => H - PAD - p * (H - 2 * PAD);
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
  ui.curveXLast.textContent = String(n - 1);
  for (const z of state.camSlices) {
    node.append(svg("line", { class: "cam-tick", x1: x(z), x2: x(z), y1: H - 6, y2: H }));
  }
  const cursor = svg("line", { class: "cursor", id: "curve-cursor", x1: x(state.z), x2: x(state.z), y1: 0, y2: H });
  node.append(cursor);
  const title = svg("title");
  title.textContent = "Slice cancer probability by slice; white line: current slice";
  node.append(title);
}

/** Move the cursor to state.z. */
export function moveCurveCursor() {
  const cursor = ui.curve.querySelector("#curve-cursor");
  if (!cursor) return;
  const xz = sliceX(state.z);
  cursor.setAttribute("x1", String(xz));
  cursor.setAttribute("x2", String(xz));
}

/** The slice under a click at `clientX` on the curve (page pixels). */
export function curveSliceAt(clientX) {
  const box = ui.curve.getBoundingClientRect();
  const frac = clamp((clientX - box.left) / box.width, 0, 1);
  return Math.round(frac * (state.nSlices - 1));
}
