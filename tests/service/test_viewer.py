"""The web viewer end to end in headless Chromium against the real service app.

The real ``create_app`` serves a real (tiny, trained) ``Predictor`` from uvicorn on a free
loopback port; Playwright drives the system Chromium (``scripts/install_browser.sh``; nothing is
downloaded). The page is checked the way a reader uses it: sign in (a wrong token first), the
error messages for a too-large upload and a failed job, then a study: slices by slider, wheel
and keys, window presets, tumour overlay and Grad-CAM toggles, the lesion table and decision,
the probability curve and a report download. What the page shows is compared pixel for pixel
with what the API renders for the same settings, and screenshots of the image region must be
neither blank nor unchanged by the overlay toggle when the slice has tumour pixels.

Set ``LUNGCAD_VIEWER_SCREENSHOTS=DIR`` to keep the screenshots for a look.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from PIL import Image
from playwright import sync_api

from lungcad.data.synthetic.phantom import make_phantom
from lungcad.inference.predictor import Predictor
from lungcad.io.writers import write_image
from lungcad.service.app import create_app
from lungcad.service.jobs.schema import API_PREFIX
from tests.inference_helpers import SIZE, shared_trained_run
from tests.service_helpers import TOKEN
from tests.system_tools import require_tool

# playwright, uvicorn and FastAPI are dependencies (`.[dev]`), imported plainly; the browser
# is a system tool: without it these tests skip on a user's machine and fail under CI=true.
CHROMIUM = os.environ.get("LUNGCAD_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(autouse=True, scope="module")
def chromium_installed() -> None:
    require_tool(
        os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK),
        f"Chromium not installed at {CHROMIUM}: run scripts/install_browser.sh as root "
        "(`make system-deps` does) or set LUNGCAD_CHROMIUM",
    )


expect = sync_api.expect

VIEWPORT = {"width": 1280, "height": 800}
# The flags the project runs Chromium with: headless, no sandbox (root in a container), and
# nothing that talks to the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_UNPACKED_MB = 0.5  # the test study is 0.13 MB of voxels; the "too large" one 1 MB
JOB_TIMEOUT_MS = 120_000


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, service_settings) -> Iterator[str]:
    """The real app on 127.0.0.1:<free port>, served by uvicorn in a background thread."""
    run = shared_trained_run(tmp_path_factory)
    predictor = Predictor.from_checkpoint(run, batch_size=4)
    settings = service_settings(
        tmp_path_factory.mktemp("service_data"), max_unpacked_mb=MAX_UNPACKED_MB
    )
    app = create_app(predictor, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small phantom NIfTI, one declaring too many voxels, and one with truncated pixels."""
    root = tmp_path_factory.mktemp("viewer_studies")
    phantom = make_phantom(3, shape_zyx=(8, SIZE, SIZE), matrix=SIZE, n_nodules=1, size_mm=20.0)
    good = write_image(phantom.volume, root / "phantom.nii.gz")
    # 64^3 float32 = 1 MB of voxels > MAX_UNPACKED_MB, though the gzip is tiny.
    big = root / "too_large.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), big)
    # A well-formed NIfTI of complex voxels: the upload check (header: shape and size) lets it
    # through, and the job fails when read_image refuses non-real values.
    broken = root / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, 8), np.complex64), np.eye(4)), broken)
    return {"good": good, "big": big, "broken": broken}


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("LUNGCAD_VIEWER_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("viewer_screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    """A fresh Chromium profile (its own --user-data-dir) at 1280x800."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
            accept_downloads=True,
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


# ---------------------------------------------------------------------------- helpers


def api_get(base: str, path: str) -> bytes:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def server_slice(base: str, job: str, z: int, window: str, overlay: int, cam: int) -> np.ndarray:
    """The API's own PNG for these settings, as (H, W, 3) uint8."""
    data = api_get(
        base, f"{API_PREFIX}/jobs/{job}/slices/{z}.png?window={window}&overlay={overlay}&cam={cam}"
    )
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_slice(page, job: str, z: int, window: str, overlay: int, cam: int) -> None:
    """Wait until the <img> shows (decoded) the slice with exactly these settings."""
    key = f"{job}|{z}|{window}|{overlay}|{cam}"
    page.wait_for_function(
        "key => { const i = document.getElementById('slice-image');"
        " return i.dataset.key === key && i.complete && i.naturalWidth > 0; }",
        arg=key,
    )


def displayed_pixels(page) -> np.ndarray:
    """The pixels of the image the page shows, at its natural size: (H, W, 3) uint8."""
    flat, width, height = page.evaluate(
        """() => { const img = document.getElementById('slice-image');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [Array.from(g.getImageData(0, 0, c.width, c.height).data), c.width, c.height]; }"""
    )
    return np.asarray(flat, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def assert_shows(page, base: str, job: str, z: int, window: str, overlay: int, cam: int) -> None:
    wait_slice(page, job, z, window, overlay, cam)
    shown = displayed_pixels(page).astype(int)
    expected = server_slice(base, job, z, window, overlay, cam).astype(int)
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).max() <= 1, f"slice {z} {window} o={overlay} c={cam}"


def image_region(page, path: Path) -> np.ndarray:
    """Screenshot of the slice image as grey (H, W) float, central 70% (no corner labels)."""
    png = page.locator("#slice-image").screenshot(path=str(path))
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    h, w = grey.shape
    return grey[int(0.15 * h) : int(0.85 * h), int(0.15 * w) : int(0.85 * w)]


def slice_text(z: int, n: int) -> str:
    return f"Slice {z} / {n - 1}"


# ---------------------------------------------------------------------------- the test


def test_viewer_end_to_end(
    server: str, studies: dict[str, Path], browser, shots_dir: Path, tmp_path: Path
) -> None:
    page = browser.new_page()
    page_errors: list[str] = []
    requests: list[tuple[str, str | None]] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("request", lambda req: requests.append((req.url, req.headers.get("authorization"))))

    # --- sign in: the page asks for the token; a wrong one is refused with a clear 401 message
    page.goto(server + "/")
    dialog = page.get_by_role("dialog", name="Sign in")
    expect(dialog).to_be_visible()
    expect(page.get_by_text("Research use; not for standalone diagnosis.").first).to_be_visible()
    page.get_by_label("Access token").fill("wrong-token-000000000000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#token-error")).to_contain_text("401")
    expect(dialog).to_be_visible()
    page.screenshot(path=str(shots_dir / "01_sign_in_refused.png"))
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#model-info")).to_contain_text("resnet18")
    assert page.evaluate("sessionStorage.getItem('lungcad.token')") == TOKEN

    upload = page.get_by_label("CT study: DICOM series as .zip, or .nii / .nii.gz")
    analyse = page.get_by_role("button", name="Analyse")
    message = page.locator("#message")

    # --- a study over the size limit: 413, said plainly
    upload.set_input_files(str(studies["big"]))
    analyse.click()
    expect(message).to_be_visible()
    expect(message).to_contain_text("too large")
    expect(message).to_contain_text("413")

    # --- a study whose job fails: the job's own error is shown
    upload.set_input_files(str(studies["broken"]))
    analyse.click()
    expect(page.locator("#job-status")).to_contain_text("Failed", timeout=JOB_TIMEOUT_MS)
    expect(message).to_contain_text("analysis failed")
    expect(message).to_contain_text("complex-valued")
    page.screenshot(path=str(shots_dir / "02_failed_job.png"))

    # --- the real study
    upload.set_input_files(str(studies["good"]))
    analyse.click()
    image = page.locator("#slice-image")
    expect(image).to_be_visible(timeout=JOB_TIMEOUT_MS)
    expect(message).to_be_hidden()
    job = page.evaluate("decodeURIComponent(location.hash.slice('#job='.length))")
    result = json.loads(api_get(server, f"{API_PREFIX}/jobs/{job}/result"))
    n = result["n_slices"]
    assert n == 8

    # Decision, probability and threshold as the API says.
    expect(page.locator("#study-probability")).to_have_text(f"{result['study_probability']:.3f}")
    expect(page.locator("#threshold")).to_contain_text(f"{result['threshold']:.3f}")
    expect(page.locator("#decision-badge")).to_have_text(
        "Suspicious for cancer" if result["is_cancer"] else "Not suspicious"
    )
    # The curve has one point per evaluated slice, and a cursor.
    runs, length = [], 0  # runs of evaluated slices (None = slice without lung)
    for p in result["slice_probabilities"] + [None]:
        if p is None and length:
            runs.append(length + (length == 1))  # a lone point is drawn as a short segment
            length = 0
        elif p is not None:
            length += 1
    points = page.evaluate(
        "[...document.querySelectorAll('#prob-curve polyline')]"
        ".map(l => l.getAttribute('points').trim().split(/\\s+/).length)"
    )
    assert points == runs
    expect(page.locator("#curve-cursor")).to_have_count(1)

    # Lesion table: one row per lesion with the API's numbers; a click goes to its slice.
    lesions = result["lesions"]
    rows = page.locator("#lesion-rows tr")
    expect(rows).to_have_count(len(lesions))
    if lesions:
        first = lesions[0]
        cells = rows.nth(0).locator("td")
        expect(cells.nth(0)).to_have_text(str(first["id"]))
        expect(cells.nth(2)).to_have_text(f"{first['longest_axial_diameter_mm']:.1f}")
        lo, hi = first["slice_range"]
        expect(cells.nth(3)).to_have_text(f"{lo}–{hi}")
        if first["max_probability"] is not None:
            expect(cells.nth(5)).to_have_text(f"{first['max_probability']:.2f}")
        z0 = first["diameter_slice"]
    else:
        expect(page.locator("#lesion-empty")).to_be_visible()
        probs = [-1.0 if p is None else p for p in result["slice_probabilities"]]
        z0 = int(np.argmax(probs))
    # The page opens on the largest lesion (or the most suspicious slice).
    expect(page.locator("#slice-number")).to_have_text(slice_text(z0, n))
    assert_shows(page, server, job, z0, "lung", 1, 0)
    page.screenshot(path=str(shots_dir / "03_result.png"))

    # --- a real picture, not a blank box
    with_overlay = image_region(page, shots_dir / "04_image_overlay.png")
    assert with_overlay.std() > 10, "the slice image region is (nearly) blank"

    # --- tumour overlay toggle: changes the picture exactly when the slice has tumour pixels
    overlay = page.get_by_role("checkbox", name="Tumour overlay")
    expect(overlay).to_be_checked()
    overlay.uncheck()
    assert_shows(page, server, job, z0, "lung", 0, 0)
    without_overlay = image_region(page, shots_dir / "05_image_no_overlay.png")
    tumour_here = not np.array_equal(
        server_slice(server, job, z0, "lung", 1, 0), server_slice(server, job, z0, "lung", 0, 0)
    )
    changed = np.abs(with_overlay - without_overlay).mean()
    if tumour_here:
        assert changed > 1.0, "the overlay toggle did not change the image"
    else:
        assert changed < 0.5, "the overlay toggle changed an image without tumour pixels"
    page.keyboard.press("o")  # the shortcut turns it back on
    expect(overlay).to_be_checked()
    assert_shows(page, server, job, z0, "lung", 1, 0)

    # --- window presets
    for name, label in (("mediastinal", "Mediastinal"), ("bone", "Bone"), ("lung", "Lung")):
        page.get_by_role("radio", name=label).check()
        assert_shows(page, server, job, z0, name, 1, 0)
        if name == "mediastinal":
            page.screenshot(path=str(shots_dir / "06_mediastinal.png"))
            mediastinal = image_region(page, shots_dir / "06_image_mediastinal.png")
            assert np.abs(mediastinal - with_overlay).mean() > 1.0

    # --- slice navigation: slider, keys, wheel; the number follows
    slider = page.get_by_role("slider", name="Slice")
    slider.fill("0")
    expect(page.locator("#slice-number")).to_have_text(slice_text(0, n))
    assert_shows(page, server, job, 0, "lung", 1, 0)
    page.locator("#stage").focus()
    page.keyboard.press("ArrowDown")
    expect(page.locator("#slice-number")).to_have_text(slice_text(1, n))
    page.keyboard.press("End")
    expect(page.locator("#slice-number")).to_have_text(slice_text(n - 1, n))
    page.keyboard.press("ArrowUp")
    expect(page.locator("#slice-number")).to_have_text(slice_text(n - 2, n))
    page.locator("#stage").hover()
    page.mouse.wheel(0, -120)
    expect(page.locator("#slice-number")).to_have_text(slice_text(n - 3, n))
    assert_shows(page, server, job, n - 3, "lung", 1, 0)
    cursor_x = page.evaluate("Number(document.querySelector('#curve-cursor').getAttribute('x1'))")
    assert cursor_x == pytest.approx((n - 3) / (n - 1) * 320)

    # --- Grad-CAM: only on the slices that have a heat map
    cam = page.get_by_role("checkbox", name="Grad-CAM")
    cam_slices = result["cam_slices"]
    assert cam_slices, "the predictor computes Grad-CAM for the most suspicious slices"
    off_cam = [z for z in range(n) if z not in cam_slices]
    if off_cam:
        slider.fill(str(off_cam[0]))
        expect(cam).to_be_disabled()
    zc = cam_slices[0]
    slider.fill(str(zc))
    expect(cam).to_be_enabled()
    no_cam = image_region(page, shots_dir / "07_image_before_cam.png")
    cam.check()
    assert_shows(page, server, job, zc, "lung", 1, 1)
    with_cam = image_region(page, shots_dir / "07_image_cam.png")
    page.screenshot(path=str(shots_dir / "07_cam.png"))
    heat_here = not np.array_equal(
        server_slice(server, job, zc, "lung", 1, 1), server_slice(server, job, zc, "lung", 1, 0)
    )
    if heat_here:
        assert np.abs(with_cam - no_cam).mean() > 0.5, "the Grad-CAM toggle changed nothing"
    if off_cam:  # leaving the CAM slices shows the plain slice again
        slider.fill(str(off_cam[0]))
        assert_shows(page, server, job, off_cam[0], "lung", 1, 0)

    # A lesion row takes the reader to its slice.
    if lesions:
        rows.nth(0).click()
        expect(page.locator("#slice-number")).to_have_text(slice_text(z0, n))

    # --- downloads: report via fetch with the token; SEG/SR only exist for DICOM input
    with page.expect_download() as info:
        page.get_by_role("button", name="Report (HTML)").click()
    download = info.value
    assert download.suggested_filename == "report.html"
    report = tmp_path / "report.html"
    download.save_as(report)
    assert "standalone diagnosis" in report.read_text(encoding="utf-8")
    with page.expect_download() as info:
        page.get_by_role("button", name="Mask (NIfTI)").click()
    assert info.value.suggested_filename == "mask.nii.gz"
    for name in ("DICOM SEG", "DICOM SR"):
        button = page.get_by_role("button", name=name)
        if result["files"][name.split()[1].lower()] is None:
            expect(button).to_be_disabled()
        else:
            expect(button).to_be_enabled()

    # --- the layout fits 1280x800 without sideways scrolling; key parts are on screen
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    for selector in ("#disclaimer", "#slice-image", "#result-panel", "#slice-slider"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["width"] <= VIEWPORT["width"] + 1, selector
        assert box["y"] + box["height"] <= VIEWPORT["height"] + 1, selector
    page.screenshot(path=str(shots_dir / "08_final.png"))

    # --- a reload keeps the session (token in sessionStorage) and reopens the study (#job=)
    page.reload()
    expect(page.locator("#slice-image")).to_be_visible()
    expect(dialog).to_be_hidden()
    expect(page.locator("#study-probability")).to_have_text(f"{result['study_probability']:.3f}")

    # --- every API call carried the token; nothing was fetched from outside the service
    api_calls = [(url, auth) for url, auth in requests if API_PREFIX + "/" in url]
    assert api_calls
    good = [auth for url, auth in api_calls if auth != "Bearer wrong-token-000000000000"]
    assert len(good) == len(api_calls) - 1  # only the refused sign-in used the wrong token
    assert all(auth == f"Bearer {TOKEN}" for auth in good)
    outside = [url for url, _ in requests if not url.startswith((server, "blob:", "data:"))]
    assert outside == []
    assert page_errors == []


def sign_in(page, server: str) -> None:
    page.goto(server + "/")
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("dialog", name="Sign in")).to_be_hidden()


def drop_file(page, selector: str, path: Path) -> None:
    """Drop ``path`` onto the element as a user dragging it from the desktop would."""
    transfer = page.evaluate_handle(
        """([name, bytes]) => { const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name)); return dt; }""",
        [path.name, list(path.read_bytes())],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_viewer_modules_beyond_the_walkthrough(
    server: str, studies: dict[str, Path], browser, tmp_path: Path
) -> None:
    """What the end-to-end walk does not touch: the upload form's own checks and drag and drop
    (upload.js), dismissing a message (messages.js), keys for windows and jumps and the Grad-CAM
    slice buttons (slice_view.js), clicking the curve (curve.js), a lesion row by keyboard
    (results.js), the recent-studies list (jobs.js) and signing out (session.js)."""
    page = browser.new_page()
    page_errors: list[str] = []
    posts: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
    sign_in(page, server)
    message = page.locator("#message")

    # --- the form checks what it can before sending anything
    page.get_by_role("button", name="Analyse").click()
    expect(message).to_contain_text("Choose a study file first")
    page.get_by_role("button", name="Dismiss message").click()
    expect(message).to_be_hidden()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a study")
    page.get_by_label("CT study: DICOM series as .zip, or .nii / .nii.gz").set_input_files(
        str(notes)
    )
    page.get_by_role("button", name="Analyse").click()
    expect(message).to_contain_text('"notes.txt" is not a study this service reads')
    assert posts == []

    # --- a study dropped onto the image area is uploaded and opened
    drop_file(page, "#stage", studies["good"])
    expect(page.locator("#slice-image")).to_be_visible(timeout=JOB_TIMEOUT_MS)
    assert [url for url in posts if url.endswith(API_PREFIX + "/studies")] == [posts[0]]
    job = page.evaluate("decodeURIComponent(location.hash.slice('#job='.length))")
    result = json.loads(api_get(server, f"{API_PREFIX}/jobs/{job}/result"))
    n = result["n_slices"]

    # --- keys: Home/End/PageDown jump, 1-3 choose the window
    page.locator("#stage").focus()
    page.keyboard.press("Home")
    expect(page.locator("#slice-number")).to_have_text(slice_text(0, n))
    page.keyboard.press("PageDown")
    expect(page.locator("#slice-number")).to_have_text(slice_text(min(10, n - 1), n))
    for key, window in (("2", "mediastinal"), ("3", "bone"), ("1", "lung")):
        page.keyboard.press(key)
        expect(page.locator(f"#window-{window}")).to_be_checked()
        assert_shows(page, server, job, min(10, n - 1), window, 1, 0)

    # --- the curve: a click near its right end goes to the last slice (x is rounded)
    curve = page.locator("#prob-curve")
    box = curve.bounding_box()
    assert box is not None
    curve.click(position={"x": box["width"] * (1 - 0.3 / n), "y": box["height"] / 2})
    expect(page.locator("#slice-number")).to_have_text(slice_text(n - 1, n))

    # --- Grad-CAM slice buttons next to the toggle
    zc = result["cam_slices"][0]
    page.get_by_role("button", name=f"Go to Grad-CAM slice {zc}").click()
    expect(page.locator("#slice-number")).to_have_text(slice_text(zc, n))
    expect(page.get_by_role("checkbox", name="Grad-CAM")).to_be_enabled()

    # --- a lesion row by keyboard
    if result["lesions"]:
        z0 = result["lesions"][0]["diameter_slice"]
        page.keyboard.press("End" if z0 != n - 1 else "Home")  # somewhere else first
        row = page.locator("#lesion-rows tr").nth(0)
        row.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#slice-number")).to_have_text(slice_text(z0, n))
        expect(row).to_have_class(re.compile(r"\bselected\b"))

    # --- recent studies: the job is listed and opens again from there
    recent = page.locator("#recent-jobs button", has_text=f"job {job[:8]}")
    expect(recent).to_have_count(1)
    expect(recent).to_have_attribute("title", f"Open job {job}")
    page.evaluate("history.replaceState(null, '', location.pathname)")
    recent.click()
    expect(page.locator("#study-probability")).to_have_text(f"{result['study_probability']:.3f}")
    assert page.evaluate("location.hash") == f"#job={job}"

    # --- signing out forgets the token and the study
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("dialog", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('lungcad.token')") is None
    assert page.evaluate("location.hash") == ""
    expect(page.locator("#slice-image")).to_be_hidden()
    expect(page.locator("#result-panel")).to_be_hidden()
    expect(page.locator("#model-info")).to_have_text("not signed in")
    assert page_errors == []


def test_install_script_is_idempotent_when_chromium_is_present() -> None:
    """Chromium is there (else this test skips, or fails under CI): the script says so and
    changes nothing."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "install_browser.sh"
    bash = shutil.which("bash")
    require_tool(bash is not None, "bash is not installed: apt-get install bash")
    assert bash is not None
    done = subprocess.run(
        [bash, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )
    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout
