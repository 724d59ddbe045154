/* Small pure helpers: numbers, text and timing. No DOM, no state. */

export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
export const isNum = (v) => typeof v === "number" && Number.isFinite(v);
/** `v` with `digits` decimals, or an en dash for a missing value (null, NaN). */
export const fmt = (v, digits) => (isNum(v) ? v.toFixed(digits) : "–");

/** The text without its final full stop, so it can be embedded in a sentence. */
export const clause = (text) => String(text).trim().replace(/[.\s]+$/, "");
