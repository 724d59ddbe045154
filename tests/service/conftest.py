"""Fixtures of the service tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lungcad.service.app import ServiceSettings
from tests.service_helpers import TOKEN, hu_volume, nifti_bytes

SettingsFactory = Callable[..., ServiceSettings]


@pytest.fixture(scope="session")
def service_settings() -> SettingsFactory:
    """``make(data_dir, **options)``: the :class:`ServiceSettings` of a test service.

    The service accepts :data:`tests.service_helpers.TOKEN` (``AUTH``) unless ``tokens`` is
    given; every other option is a ``ServiceSettings`` attribute (limits, retention, ...).
    Session-scoped so module-scoped app fixtures can use it.
    """

    def make(data_dir: str | Path, **options: Any) -> ServiceSettings:
        options.setdefault("tokens", frozenset({TOKEN}))
        return ServiceSettings(Path(data_dir), **options)

    return make


@pytest.fixture(scope="session")
def nifti(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small HU study (``service_helpers.hu_volume``) as .nii.gz bytes, made once."""
    return nifti_bytes(hu_volume(), tmp_path_factory.mktemp("nifti"))
