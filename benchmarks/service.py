"""REST service load benchmark: latency percentiles, throughput and errors under N clients.

Run (prints its figures; not a test; exit status 1 when any request or job failed)::

    .venv/bin/python benchmarks/service.py                          # 4 clients, 20 s
    .venv/bin/python benchmarks/service.py --clients 50 --duration 60   # the documented run
    .venv/bin/python benchmarks/service.py --clients 8 --duration 60 --checkpoint runs/cls

What happens:

1. ``lungcad serve`` starts in a subprocess on 127.0.0.1 (a free port), with a fresh data
   folder, one random token per client (``client=bench-NN`` in the token file, so every
   client owns its jobs) and ``--checkpoint`` (default: a tiny randomly initialised
   ResNet18 run at 64x64, made in a temporary folder: the figures measure the service, not
   the model);
2. ``--clients`` threads, each with its own ``httpx.Client`` and token, run for
   ``--duration`` seconds: each submits up to ``--studies`` small NIfTI studies (synthetic
   phantoms, ``--slices`` x ``--matrix`` x ``--matrix``), polls its job every 0.2 s, and when
   a job is done fetches its result and scrolls through its slices (PNG); in between it
   calls ``/health``, ``/api/v1/model`` and ``/api/v1/jobs`` (whose answer must hold only its
   own jobs) and asks for another client's job (which must answer 404);
3. after the duration, jobs still queued are waited for (at most ``--drain`` seconds).

Printed: per endpoint the request count, p50/p95/p99/max latency in ms and errors (any
response other than the expected status, or a transport error; 503 "queue full" answers are
counted separately, they are the service working as designed); all requests together
(p50/p95/p99); requests/s; job turnaround (submit to done, as seen by polling) and
jobs/minute; the server's resident memory (RSS, from ``/proc``) when ready, after the load
and at its peak (VmHWM). ``--json FILE`` writes the same figures as JSON. The clients run in
this process and the server in another, so client overhead does not slow the server's
Python.
"""

from __future__ import annotations

import argparse
import json
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


def _rss_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in MB (Linux)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024.0  # kB
    return {"rss_mb": found["VmRSS"], "peak_rss_mb": found["VmHWM"]}


class Recorder:
    """Thread-safe latency and error counts per endpoint label, and every client's jobs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.busy: dict[str, int] = defaultdict(int)
        self.turnaround: list[float] = []
        self.jobs: dict[str, int] = {}  # job id -> the client that submitted it

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
    mine: set[str] = set()
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
                    job_id = response.json()["job_id"]
                    pending[job_id] = time.monotonic()
                    mine.add(job_id)
                    with rec.lock:
                        rec.jobs[job_id] = seed
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
                (f"GET {API_PREFIX}/jobs/{{id}} (another client's)", None),
            ][int(rng.integers(4))]
            if path is None:  # another client's job must look like no job at all
                with rec.lock:
                    others = [j for j, owner in rec.jobs.items() if owner != seed]
                if others:
                    other = others[int(rng.integers(len(others)))]
                    rec.call(label, lambda j=other: http.get(f"{API_PREFIX}/jobs/{j}"), 404)
            else:
                response = rec.call(label, lambda p=path: http.get(p))
                if path.endswith("/jobs") and response is not None and response.is_success:
                    listed = {j["job_id"] for j in response.json()}
                    if not listed <= mine:
                        with rec.lock:
                            rec.errors["another client's job listed"] += 1
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


def _report(rec: Recorder, wall: float, args: argparse.Namespace, memory: dict[str, float]) -> dict:
    """Print the figures; returns them as a JSON-ready dict."""
    figures: dict = {
        "clients": args.clients,
        "duration_s": args.duration,
        "study": f"{args.slices}x{args.matrix}x{args.matrix} NIfTI",
        "endpoints": {},
    }
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
        figures["endpoints"][label] = {
            "n": int(ms.size),
            "p50_ms": round(float(p50), 1),
            "p95_ms": round(float(p95), 1),
            "p99_ms": round(float(p99), 1),
            "max_ms": round(float(ms.max()), 1),
            "errors": rec.errors.get(label, 0),
            "busy_503": rec.busy.get(label, 0),
        }
    every = np.concatenate([np.asarray(v) for v in rec.latency.values()]) * 1000.0
    if every.size:
        p50, p95, p99 = np.percentile(every, [50, 95, 99])
        print(
            f"{'all requests':40s} {every.size:6d} {p50:8.1f} {p95:8.1f} {p99:8.1f} "
            f"{every.max():8.1f}"
        )
        figures["all"] = {
            "n": int(every.size),
            "p50_ms": round(float(p50), 1),
            "p95_ms": round(float(p95), 1),
            "p99_ms": round(float(p99), 1),
            "max_ms": round(float(every.max()), 1),
        }
    other = {k: v for k, v in rec.errors.items() if k not in rec.latency and v}
    errors = sum(rec.errors.values())
    print(
        f"requests: {total} in {wall:.1f} s = {total / wall:.1f} req/s; errors: {errors}"
        + (f" ({other})" if other else "")
    )
    figures.update(requests=total, wall_s=round(wall, 1), requests_per_s=round(total / wall, 1))
    figures.update(errors=errors, other_errors=other)
    if rec.turnaround:
        t = np.asarray(rec.turnaround)
        print(
            f"jobs finished: {t.size}; turnaround p50 {np.median(t):.2f} s, p95 "
            f"{np.percentile(t, 95):.2f} s, max {t.max():.2f} s; "
            f"{60.0 * t.size / wall:.1f} jobs/min"
        )
        figures["jobs"] = {
            "finished": int(t.size),
            "turnaround_p50_s": round(float(np.median(t)), 2),
            "turnaround_p95_s": round(float(np.percentile(t, 95)), 2),
            "turnaround_max_s": round(float(t.max()), 2),
            "jobs_per_min": round(60.0 * t.size / wall, 1),
        }
    print(
        f"server RSS: {memory['rss_before_mb']:.0f} MB when ready, "
        f"{memory['rss_after_mb']:.0f} MB after the load, peak {memory['peak_rss_mb']:.0f} MB"
    )
    figures["server_memory"] = {k: round(v, 1) for k, v in memory.items()}
    return figures


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
    parser.add_argument("--json", metavar="FILE", help="also write the figures here as JSON")
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
        tokens = [secrets.token_urlsafe(32) for _ in range(args.clients)]
        (tmp / "tokens.txt").write_text(
            "".join(f"{t} client=bench-{i:02d}\n" for i, t in enumerate(tokens))
        )
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
        figures: dict = {"errors": 1}  # until measured
        try:
            _wait_ready(base, server, timeout=180.0)
            before = _rss_mb(server.pid)
            rec = Recorder()
            start = time.monotonic()
            deadline = start + args.duration
            threads = [
                threading.Thread(
                    target=_client, args=(base, tokens[i], studies, args, rec, deadline, i)
                )
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            after = _rss_mb(server.pid)
            memory = {
                "rss_before_mb": before["rss_mb"],
                "rss_after_mb": after["rss_mb"],
                "peak_rss_mb": after["peak_rss_mb"],
            }
            figures = _report(rec, time.monotonic() - start, args, memory)
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
