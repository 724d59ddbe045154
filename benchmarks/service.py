"""REST service load benchmark: latency percentiles, throughput and errors under N clients.

Run (prints its figures; not a test)::

    .venv/bin/python benchmarks/service.py                          # 4 clients, 20 s
    .venv/bin/python benchmarks/service.py --clients 8 --duration 60 --checkpoint runs/cls

What happens:

1. ``lungcad serve`` starts in a subprocess on 127.0.0.1 (a free port), with a fresh data
   folder, a random token and ``--checkpoint`` (default: a tiny randomly initialised
   ResNet18 run at 64x64, made in a temporary folder: the figures measure the service, not
   the model);
2. ``--clients`` threads, each with its own ``httpx.Client``, run for ``--duration`` seconds:
   each submits up to ``--studies`` small NIfTI studies (synthetic phantoms,
   ``--slices`` x ``--matrix`` x ``--matrix``), polls its job every 0.2 s, and when a job is
   done fetches its result and scrolls through its slices (PNG); in between it calls
   ``/health``, ``/api/v1/model`` and ``/api/v1/jobs``;
3. after the duration, jobs still queued are waited for (at most ``--drain`` seconds).

Printed: per endpoint the request count, p50/p95/p99/max latency in ms and errors (any
response other than the expected status, or a transport error; 503 "queue full" answers are
counted separately, they are the service working as designed); overall requests/s; job
turnaround (submit to done, as seen by polling) and jobs/minute. The clients run in this
process and the server in another, so client overhead does not slow the server's Python.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lungcad.service.jobs.schema import API_PREFIX, FINISHED, JobStatus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tiny_run(folder: Path) -> Path:
    """A run folder with a randomly initialised ResNet18 U-Net at 64x64 (no training)."""
    from lungcad.training.checkpoint import write_untrained_run
    from lungcad.training.config import load_config

    # init_from marks the random decoder as trained, so jobs run the mask path as in use.
    config = load_config(
        None,
        [
            "model.name=resnet18",
            "model.image_size=64",
            "train.stage=cls",
            f"train.init_from={folder}",
        ],
    )
    return write_untrained_run(folder, config, seed=0)


def _studies(folder: Path, n: int, slices: int, matrix: int) -> list[bytes]:
    """``n`` synthetic chest CTs as .nii.gz bytes."""
    import SimpleITK as sitk

    from lungcad.data.synthetic.phantom import make_phantom

    out = []
    for seed in range(n):
        phantom = make_phantom(
            seed, shape_zyx=(slices, matrix, matrix), matrix=matrix, n_nodules=1, size_mm=20.0
        )
        path = folder / f"study{seed}.nii.gz"
        sitk.WriteImage(phantom.volume.to_sitk(), str(path))
        out.append(path.read_bytes())
    return out


class Recorder:
    """Thread-safe latency and error counts per endpoint label."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.busy: dict[str, int] = defaultdict(int)
        self.turnaround: list[float] = []

    def call(self, label: str, send, expected: int = 200):
        start = time.perf_counter()
        try:
            response = send()
        except Exception:  # a transport error is an error of the service under load
            with self.lock:
                self.errors[label] += 1
            return None
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latency[label].append(elapsed)
            if response.status_code == 503:
                self.busy[label] += 1
            elif response.status_code != expected:
                self.errors[label] += 1
        return response


def _client(
    base: str,
    token: str,
    studies: list[bytes],
    args: argparse.Namespace,
    rec: Recorder,
    deadline: float,
    seed: int,
) -> None:
    import httpx

    rng = np.random.default_rng(seed)
    headers = {"Authorization": f"Bearer {token}"}
    pending: dict[str, float] = {}
    submitted = 0
    next_poll = 0.0
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as http:
        while time.monotonic() < deadline:
            if submitted < args.studies and not pending:
                data = studies[int(rng.integers(len(studies)))]
                response = rec.call(
                    f"POST {API_PREFIX}/studies",
                    lambda d=data: http.post(
                        f"{API_PREFIX}/studies", files={"file": ("study.nii.gz", d)}
                    ),
                    expected=202,
                )
                if response is not None and response.status_code == 202:
                    pending[response.json()["job_id"]] = time.monotonic()
                    submitted += 1
            if pending and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.2
                for job_id, since in list(pending.items()):
                    response = rec.call(
                        f"GET {API_PREFIX}/jobs/{{id}}",
                        lambda j=job_id: http.get(f"{API_PREFIX}/jobs/{j}"),
                    )
                    if response is None or response.status_code != 200:
                        continue
                    status = response.json()["status"]
                    if status in FINISHED:
                        del pending[job_id]
                        with rec.lock:
                            rec.turnaround.append(time.monotonic() - since)
                        if status == JobStatus.DONE:
                            _view(http, job_id, rec)
                        else:
                            with rec.lock:
                                rec.errors["job failed"] += 1
            label, path = [
                ("GET /health", "/health"),
                (f"GET {API_PREFIX}/model", f"{API_PREFIX}/model"),
                (f"GET {API_PREFIX}/jobs", f"{API_PREFIX}/jobs"),
            ][int(rng.integers(3))]
            rec.call(label, lambda p=path: http.get(p))
            time.sleep(args.think)
        drain = time.monotonic() + args.drain
        while pending and time.monotonic() < drain:  # let submitted jobs finish
            for job_id, since in list(pending.items()):
                response = rec.call(
                    f"GET {API_PREFIX}/jobs/{{id}}",
                    lambda j=job_id: http.get(f"{API_PREFIX}/jobs/{j}"),
                )
                if response is not None and response.json().get("status") in FINISHED:
                    del pending[job_id]
                    with rec.lock:
                        rec.turnaround.append(time.monotonic() - since)
            time.sleep(0.2)
        with rec.lock:
            rec.errors["jobs unfinished"] += len(pending)


def _view(http, job_id: str, rec: Recorder) -> None:
    """What the viewer does when a job is done: the result, then scroll the slices."""
    response = rec.call(
        f"GET {API_PREFIX}/jobs/{{id}}/result",
        lambda: http.get(f"{API_PREFIX}/jobs/{job_id}/result"),
    )
    if response is None or response.status_code != 200:
        return
    for z in range(response.json()["n_slices"]):
        rec.call(
            f"GET {API_PREFIX}/jobs/{{id}}/slices/{{z}}.png",
            lambda z=z: http.get(
                f"{API_PREFIX}/jobs/{job_id}/slices/{z}.png?window=lung&overlay=1&cam=1"
            ),
        )


def _wait_ready(base: str, server: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(base + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready after {timeout} s")


def _report(rec: Recorder, wall: float, args: argparse.Namespace) -> None:
    print(
        f"\nservice benchmark: {args.clients} clients, {args.duration:g} s, studies "
        f"{args.slices}x{args.matrix}x{args.matrix} NIfTI, up to {args.studies} per client"
    )
    print(
        f"{'endpoint':40s} {'n':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
        f"{'max ms':>8s} {'errors':>6s} {'503':>5s}"
    )
    total = 0
    for label in sorted(rec.latency):
        ms = np.asarray(rec.latency[label]) * 1000.0
        total += ms.size
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(
            f"{label:40s} {ms.size:6d} {p50:8.1f} {p95:8.1f} {p99:8.1f} {ms.max():8.1f} "
            f"{rec.errors.get(label, 0):6d} {rec.busy.get(label, 0):5d}"
        )
    other = {k: v for k, v in rec.errors.items() if k not in rec.latency and v}
    errors = sum(rec.errors.values())
    print(
        f"requests: {total} in {wall:.1f} s = {total / wall:.1f} req/s; errors: {errors}"
        + (f" ({other})" if other else "")
    )
    if rec.turnaround:
        t = np.asarray(rec.turnaround)
        print(
            f"jobs finished: {t.size}; turnaround p50 {np.median(t):.2f} s, p95 "
            f"{np.percentile(t, 95):.2f} s, max {t.max():.2f} s; "
            f"{60.0 * t.size / wall:.1f} jobs/min"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="run folder (default: a tiny random ResNet18)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--studies", type=int, default=2, help="studies per client (at most)")
    parser.add_argument("--slices", type=int, default=8, help="slices per study")
    parser.add_argument("--matrix", type=int, default=128, help="in-plane size of a study")
    parser.add_argument(
        "--think", type=float, default=0.05, help="seconds each client waits between requests"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=120.0,
        help="seconds to wait for submitted jobs after the load",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads in the server (lungcad serve --threads)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lungcad-service-bench-") as tmp_name:
        tmp = Path(tmp_name)
        run = Path(args.checkpoint) if args.checkpoint else _tiny_run(tmp / "run")
        studies = _studies(tmp, 3, args.slices, args.matrix)
        token = secrets.token_urlsafe(32)
        (tmp / "tokens.txt").write_text(token + "\n")
        (tmp / "tokens.txt").chmod(0o600)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "lungcad.cli.serve",
            "--checkpoint",
            str(run),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp / "data"),
            "--token-file",
            str(tmp / "tokens.txt"),
            "--queue-size",
            "64",
        ]
        if args.server_threads:
            command += ["--threads", str(args.server_threads)]
        log = (tmp / "server.log").open("w")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(base, server, timeout=180.0)
            rec = Recorder()
            start = time.monotonic()
            deadline = start + args.duration
            threads = [
                threading.Thread(
                    target=_client, args=(base, token, studies, args, rec, deadline, i)
                )
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            _report(rec, time.monotonic() - start, args)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
