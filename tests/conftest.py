"""Fixtures shared by every test package (tiny configs, tiny manifests, service settings)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from lungcad.training.config import Config
from tests.inference_helpers import DEFAULT_SPLITS, make_manifest, make_tiny_config


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builds tiny prepared folders (``tests.inference_helpers.make_manifest``), each in a new
    temporary folder: ``tiny_manifest({"test": 4}, size=48, spacing=2.0)``."""

    def build(splits: Mapping[str, int] = DEFAULT_SPLITS, **options: Any) -> Path:
        return make_manifest(tmp_path_factory.mktemp("manifest"), splits, **options)

    return build


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """Builds tiny training configs (``tests.inference_helpers.make_tiny_config``):
    ``tiny_config(manifest, out_dir, "train.stage=cls", "optim.epochs=2")``."""
    return make_tiny_config


@pytest.fixture(scope="session")
def modules_imported_by() -> Callable[[str], set[str]]:
    """``modules_imported_by("lungcad.x")``: every module a fresh interpreter has loaded after
    importing ``lungcad.x``, for checking that a light module stays light."""

    def imported(module: str) -> set[str]:
        code = f"import sys, {module}; print(' '.join(sys.modules))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    return imported
