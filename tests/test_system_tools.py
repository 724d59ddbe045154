"""tests/system_tools.py and the CI around it: a missing tool skips on a user's machine and
fails under CI=true, no test skips for a missing tool any other way, and ``make system-deps``
fails the build under CI when an install fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system_tools import in_ci, require_tool

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

#: A skip that is not about a missing tool: a GPU is hardware, which CI need not have.
HARDWARE_SKIP = "torch.cuda.is_available()"
SKIP_CALL = re.compile(r"pytest\.(skip|importorskip)\(|mark\.skip(if)?\(|\bskipif\(")


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    monkeypatch.setenv("CI", "false")
    assert not in_ci()
    monkeypatch.delenv("CI")
    assert not in_ci()


def test_require_tool_skips_on_a_users_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    require_tool(True, "present: nothing happens")
    with pytest.raises(pytest.skip.Exception, match="Orthanc is not installed"):
        require_tool(False, "Orthanc is not installed: make system-deps")


def test_require_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require_tool(True, "present: nothing happens")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*Chromium is not installed"):
        require_tool(False, "Chromium is not installed: make system-deps")
    # At a module's top level too (a collection error under CI, not a skipped module).
    with pytest.raises(pytest.fail.Exception):
        require_tool(False, "dciodvfy is not installed", allow_module_level=True)


def test_no_test_skips_for_a_missing_tool_without_require_tool() -> None:
    """Every skip in the test suite goes through require_tool, so CI=true fails instead.

    The only other skip allowed is a missing GPU (hardware, not something CI installs).
    """
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("system_tools.py", Path(__file__).name):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SKIP_CALL.search(line) and HARDWARE_SKIP not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "skips that bypass tests.system_tools.require_tool:\n" + "\n".join(
        offenders
    )


def _system_deps(ci: str | None, orthanc: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    require_tool(make is not None, "make is not installed: apt-get install make")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MAKEFLAGS", "MAKELEVEL")}
    if ci is not None:
        env["CI"] = ci
    # The real installers are replaced: `false` is an install that fails, `true` one that works.
    return subprocess.run(
        [str(make), "-s", "-C", str(ROOT), "system-deps"]
        + [f"ORTHANC_INSTALL={orthanc}", "BROWSER_INSTALL=true"]
        + ["DCMTK_INSTALL=true", "DICOM3TOOLS_INSTALL=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_make_system_deps_fails_under_ci_when_an_install_fails() -> None:
    assert _system_deps("true", "true").returncode == 0
    failed = _system_deps("true", "false")
    assert failed.returncode != 0
    assert "Orthanc unavailable" in failed.stderr and "the build fails" in failed.stderr


def test_make_system_deps_only_warns_on_a_users_machine() -> None:
    done = _system_deps(None, "false")
    assert done.returncode == 0
    assert "Orthanc unavailable" in done.stderr and "skipped" in done.stderr


def test_ci_script_sets_ci_and_runs_the_slow_tests() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for line in script.splitlines()]
    assert "export CI=true" in commands
    assert "make test" in commands and "make test-slow" in commands
