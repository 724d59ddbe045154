"""Tests that need a system tool (Orthanc, Chromium, dicom3tools, dcmqi, pyradiomics).

On a user's machine a missing tool skips the tests that need it, saying how to install it.
Under ``CI=true`` (``.ci/run``) the same absence fails the test instead: CI installs every tool
(``make system-deps``), so a missing one is a broken install that must not pass silently.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["in_ci", "require_tool"]


def in_ci() -> bool:
    """True under CI (the ``CI`` environment variable is ``true``, as ``.ci/run`` sets it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_tool(available: bool, what: str, *, allow_module_level: bool = False) -> None:
    """Skip (or, under CI, fail) the calling test when ``available`` is False.

    Args:
        available: whether the tool is there and works.
        what: one line naming the tool and how to install it, e.g.
            "dciodvfy (dicom3tools) is not installed: make system-deps".
        allow_module_level: as for ``pytest.skip``, when called at a module's top level.
    """
    if available:
        return
    if in_ci():
        pytest.fail(f"CI=true and a required tool is missing: {what}", pytrace=False)
    pytest.skip(what, allow_module_level=allow_module_level)
