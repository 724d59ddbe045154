"""Tests for lungcad.data.grouping: patients found from the images of scan-ordered 2D sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lungcad.data.grouping import (
    hash_distance,
    near_duplicate_pairs,
    perceptual_hash,
    purge_split_boundaries,
    scan_runs,
    thumbnail,
)
from lungcad.data.layouts.groups_report import BOUNDARY_SHEET, GROUPS_FILE
from lungcad.data.layouts.prepare import prepare_dataset
from lungcad.data.layouts.settings import GroupingSettings, PrepareSettings
from lungcad.data.manifest import check_no_group_leakage
from lungcad.errors import InputError


def _patient(seed: int, n: int, size: tuple[int, int] = (96, 96)) -> list[np.ndarray]:
    """``n`` slices of one 'patient': a smooth random anatomy that drifts slowly slice to slice."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=size), 6)
    drift = ndimage.gaussian_filter(rng.normal(size=size), 6)
    slices = []
    for k in range(n):
        image = base + 0.15 * k * drift + 0.02 * rng.normal(size=size)
        slices.append(((image - image.min()) / (np.ptp(image) + 1e-9)).astype(np.float32))
    return slices


def test_thumbnail_is_normalised() -> None:
    t = thumbnail(np.random.default_rng(0).uniform(size=(120, 200)))
    assert t.shape == (64, 64) and t.dtype == np.float32
    assert abs(float(t.mean())) < 1e-4 and abs(float(t.std()) - 1) < 1e-3


def test_perceptual_hash_finds_copies_not_neighbours() -> None:
    a, b = _patient(0, 1)[0], _patient(1, 1)[0]
    noisy_copy = np.clip(a + np.random.default_rng(2).normal(0, 0.01, a.shape), 0, 1)
    assert hash_distance(perceptual_hash(a), perceptual_hash(a)) == 0
    assert hash_distance(perceptual_hash(a), perceptual_hash(noisy_copy)) <= 4
    assert hash_distance(perceptual_hash(a), perceptual_hash(b)) > 12
    hashes = [perceptual_hash(x) for x in (a, b, noisy_copy)]
    assert near_duplicate_pairs(hashes, 4) == [(0, 2)]
    assert near_duplicate_pairs(hashes, -1) == []


def test_scan_runs_cut_where_the_patient_changes_and_where_the_size_changes() -> None:
    images = _patient(0, 6) + _patient(1, 5) + _patient(2, 4, size=(96, 128))
    thumbs = np.stack([thumbnail(x) for x in images])
    runs, similarity = scan_runs(thumbs, [x.shape for x in images], GroupingSettings())
    assert runs == [0] * 6 + [1] * 5 + [2] * 4
    assert len(similarity) == len(images) - 1
    assert min(similarity[:5]) > 0.8 and similarity[5] < 0.5  # within vs across patients
    # Without the size rule a high threshold still cuts; a low one merges everything.
    merged, _ = scan_runs(thumbs[:11], [(1, 1)] * 11, GroupingSettings(min_similarity=-1.0))
    assert set(merged) == {0}


def test_settings_are_checked() -> None:
    with pytest.raises(InputError, match="window"):
        GroupingSettings(window=0)
    with pytest.raises(InputError, match="min_similarity"):
        GroupingSettings(min_similarity=2.0)
    with pytest.raises(InputError, match="gap"):
        GroupingSettings(gap=-1)


def test_purge_takes_files_from_the_training_side() -> None:
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    splits = {"a": "train", "b": "test", "c": "val"}
    # a|b: train loses its last file (2); b|c: neither is train, and "test" sorts before
    # "val", so the run before the boundary (b) gives up its last file (4).
    assert purge_split_boundaries([list(range(7))], groups, splits, gap=1) == {2, 4}
    assert purge_split_boundaries([list(range(7))], groups, splits, gap=2) == {1, 2, 3, 4}
    assert purge_split_boundaries([list(range(7))], groups, splits, gap=0) == set()


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)


@pytest.fixture
def scanned_classes(tmp_path: Path) -> Path:
    """Class folders of whole 'patients' in file order; one slice recurs 20 numbers later."""
    root = tmp_path / "set"
    seed = 0
    for folder, sizes in (("Malignant", (6, 7, 5, 6)), ("Normal", (7, 6, 6, 5))):
        (root / folder).mkdir(parents=True)
        number = 1
        for n in sizes:
            for image in _patient(seed, n):
                _save(image, root / folder / f"{folder} ({number}).png")
                number += 1
            seed += 1
    # A re-encoded copy (JPEG) of Malignant (2) as file 30: a near-duplicate, not identical bytes.
    copy = np.asarray(Image.open(root / "Malignant" / "Malignant (2).png"), np.float32) / 255
    Image.fromarray(np.round(copy * 255).astype(np.uint8)).save(
        root / "Malignant" / "Malignant (30).jpg", quality=95
    )
    return root


def test_prepare_groups_patients_from_the_images(scanned_classes: Path, tmp_path: Path) -> None:
    settings = PrepareSettings(positive=("Malignant",), negative=("Normal",), seed=1)
    result = prepare_dataset(scanned_classes, tmp_path / "out", settings)
    summary = result.summary
    by_group: dict[str, set[int]] = {}
    for r in result.records:
        by_group.setdefault(r.group_id, set()).add(r.slice_index)
    # Malignant patients hold files 1-6, 7-13, 14-18, 19-24 (+ the copy 30 of file 2 joins the
    # first); Normal ones 1-7, 8-13, 14-19, 20-24. Left-out boundary files aside, every group
    # lies inside one patient and every patient in one group.
    patients = {
        "Malignant": [range(1, 7), range(7, 14), range(14, 19), range(19, 25)],
        "Normal": [range(1, 8), range(8, 14), range(14, 20), range(20, 25)],
    }
    assert summary["grouping"]["method"] == "similarity"
    assert summary["grouping"]["n_groups"] == 8
    for group, numbers in by_group.items():
        folder = group.split("_")[0]
        inside = [p for p in patients[folder] if numbers & set(p) or (30 in numbers and 2 in p)]
        assert len(inside) == 1, (group, sorted(numbers))
    rows = list(csv.DictReader((tmp_path / "out" / GROUPS_FILE).open()))
    # The copy (file 30) joined the first Malignant patient's group (files 1-6), whether or
    # not it was then left out at a split boundary.
    assert any(
        r["group_id"].startswith("Malignant") and int(r["first"]) <= 6 and r["last"] == "30"
        for r in rows
    )
    # The copy resembles file 2 and its nearest neighbours; only pairs across groups count.
    pairs = summary["near_duplicate_pairs"]
    assert pairs and all(b == "Malignant/Malignant (30).jpg" for _, b in pairs)
    assert "Malignant/Malignant (2).png" in {a for a, _ in pairs}
    check_no_group_leakage(result.records)
    # Boundary files between groups of different splits are left out of the manifest.
    left_out = summary["grouping"]["left_out_at_split_boundaries"]
    assert len(result.records) == 49 - left_out
    assert sum(int(r["left_out"]) for r in rows) == left_out
    assert sum(int(r["slices"]) for r in rows) == len(result.records)
    sheet = Image.open(tmp_path / "out" / BOUNDARY_SHEET)
    assert sheet.width > 0 and sheet.height > 0
    kept = {r.image_path for r in result.records}
    stored = {f"slices/{p.name}" for p in (tmp_path / "out" / "slices").iterdir()}
    assert stored == kept  # left-out slices are not left behind either
    assert (
        json.loads((tmp_path / "out" / "summary.json").read_text())["grouping"]
        == summary["grouping"]
    )


def test_blocks_stay_available(scanned_classes: Path, tmp_path: Path) -> None:
    settings = PrepareSettings(positive=("Malignant",), negative=("Normal",), grouping="blocks")
    result = prepare_dataset(scanned_classes, tmp_path / "out", settings)
    assert result.summary["grouping"]["method"] == "blocks"
    assert result.summary["grouping"]["left_out_at_split_boundaries"] == 0
    assert {r.group_id for r in result.records} >= {"Malignant_b000", "Normal_b000"}
    with pytest.raises(InputError, match="grouping"):
        PrepareSettings(grouping="random")
