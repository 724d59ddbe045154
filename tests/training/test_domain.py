"""The input domain recorded with a run (lungcad.training.domain)."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.data.manifest import read_manifest
from lungcad.training.domain import (
    DISPLAY,
    HU,
    MIXED,
    InputDomain,
    domain_of_records,
    layout_intensity,
)
from tests.inference_helpers import make_manifest


def test_layouts_map_to_their_intensity() -> None:
    assert layout_intensity("msd:Task06_Lung") == HU
    assert layout_intensity("luna16:subset0") == HU
    assert layout_intensity("imagemask:msd_lung_patches") == DISPLAY
    assert layout_intensity("classfolders:iqothnccd") == DISPLAY


@pytest.mark.parametrize("spacing, expected", [(2.0, 2.0 * 64 / 32), (float("nan"), None)])
def test_model_pixel_size_follows_spacing_and_letterbox(tmp_path, spacing, expected) -> None:
    folder = make_manifest(tmp_path / "m", spacing=spacing)
    records = read_manifest(folder / "manifest.csv")
    domain = domain_of_records([(r, folder) for r in records], image_size=32)
    if expected is None:
        assert domain.model_pixel_mm is None and domain.field_of_view_mm is None
    else:
        assert domain.model_pixel_mm == pytest.approx(expected)
        assert domain.field_of_view_mm == pytest.approx(spacing * 64)  # 64-px slices
    resampled = domain_of_records([(r, folder) for r in records], image_size=32, pixel_mm=1.5)
    assert resampled.resampled and resampled.model_pixel_mm == 1.5
    assert resampled.field_of_view_mm == domain.field_of_view_mm


def test_mixed_sources_and_round_trip(tmp_path) -> None:
    import dataclasses

    folder = make_manifest(tmp_path / "m")
    records = read_manifest(folder / "manifest.csv")
    mixed = [dataclasses.replace(records[0], source="msd:x"), records[1]]
    mixed[1] = dataclasses.replace(mixed[1], source="imagemask:y")
    domain = domain_of_records([(r, folder) for r in mixed], image_size=64)
    assert domain.intensity == MIXED
    assert InputDomain.from_dict(domain.to_dict()) == domain
    assert InputDomain.from_dict(None) is None
    assert "mm per model pixel" in domain.describe() or "unknown" in domain.describe()


def test_training_records_the_domain_in_the_checkpoint(tmp_path, tiny_config) -> None:
    from lungcad.training.checkpoint import load_checkpoint
    from lungcad.training.loop import train

    folder = make_manifest(tmp_path / "m", spacing=0.8)
    cfg = tiny_config(folder, tmp_path / "seg", "optim.epochs=1")
    run = train(cfg).run_dir
    info = load_checkpoint(run).info
    size = cfg.model.image_size
    side = np.load(folder / read_manifest(folder / "manifest.csv")[0].image_path).shape[0]
    assert info["input_domain"]["model_pixel_mm"] == pytest.approx(0.8 * side / size)
    assert info["seg_input_domain"] == info["input_domain"]
