"""Manifest I/O, group-level splits, record filters, the sampler and SliceDataset."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.data.dataset import SliceDataset, class_balanced_sampler
from lungcad.data.manifest import (
    MANIFEST_COLUMNS,
    SliceRecord,
    assign_splits,
    check_no_group_leakage,
    filter_records,
    read_manifest,
    split_groups,
    write_manifest,
)
from lungcad.errors import InputError, MissingInputError


def _record(
    i: int,
    group: str,
    label: int = 0,
    split: str = "train",
    mask: bool = False,
    spacing: float = math.nan,
) -> SliceRecord:
    return SliceRecord(
        sample_id=f"s{i:03d}",
        group_id=group,
        slice_index=i,
        image_path=f"slices/s{i:03d}.npy",
        mask_path=f"masks/s{i:03d}.npy" if mask else "",
        label=label,
        spacing_y=spacing,
        spacing_x=spacing,
        source="test",
        split=split,
    )


def test_manifest_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = [
        _record(0, "p1", 1, "train", True, 0.7),
        _record(1, "p2", -1, "val"),
        _record(2, "p3", 0, "test"),
    ]
    path = write_manifest(records, tmp_path / "m" / "manifest.csv")
    assert path.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    back = read_manifest(tmp_path / "m")  # the folder works too
    assert back[0] == records[0]
    for a, b in zip(back[1:], records[1:], strict=True):
        assert math.isnan(a.spacing_x) and math.isnan(b.spacing_x)
        assert dataclasses.replace(a, spacing_x=0, spacing_y=0) == dataclasses.replace(
            b, spacing_x=0, spacing_y=0
        )
    assert back[0].has_mask and not back[1].has_mask


def test_read_manifest_names_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    columns = [c for c in MANIFEST_COLUMNS if c != "group_id"]
    path.write_text(",".join(columns) + "\n")
    with pytest.raises(InputError, match="group_id") as info:
        read_manifest(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("label", "2", "label"),
        ("split", "training", "split"),
        ("slice_index", "x", "number"),
    ],
)
def test_read_manifest_rejects_bad_values(
    tmp_path: Path, column: str, value: str, match: str
) -> None:
    path = write_manifest([_record(0, "p1")], tmp_path / "manifest.csv")
    header, row = path.read_text().splitlines()
    cells = row.split(",")
    cells[MANIFEST_COLUMNS.index(column)] = value
    path.write_text(header + "\n" + ",".join(cells) + "\n")
    with pytest.raises(InputError, match=match):
        read_manifest(path)


def test_read_manifest_rejects_duplicate_ids_and_missing_file(tmp_path: Path) -> None:
    path = write_manifest([_record(0, "p1"), _record(0, "p2")], tmp_path / "manifest.csv")
    with pytest.raises(InputError, match="unique"):
        read_manifest(path)
    with pytest.raises(MissingInputError):
        read_manifest(tmp_path / "nope.csv")


def _groups(n_pos: int, n_neg: int) -> dict[str, int]:
    return {f"pos{i}": 1 for i in range(n_pos)} | {f"neg{i}": 0 for i in range(n_neg)}


def test_split_groups_is_stratified_seeded_and_order_independent() -> None:
    labels = _groups(20, 40)
    splits = split_groups(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert set(splits) == set(labels)
    for split in ("train", "val", "test"):
        members = [g for g, s in splits.items() if s == split]
        counts = Counter(labels[g] for g in members)
        # Each label stratum is split on its own: 20 % of 20 positives and of 40 negatives.
        expected = {"train": (12, 24), "val": (4, 8), "test": (4, 8)}[split]
        assert (counts[1], counts[0]) == expected
    reordered = dict(reversed(list(labels.items())))
    assert split_groups(reordered, val_fraction=0.2, test_fraction=0.2, seed=3) == splits
    other = split_groups(labels, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert other != splits


def test_split_groups_small_strata_feed_both_val_and_test() -> None:
    # Three patients per label: each stratum gives 2 to train and 1 to val or test; the
    # strata take turns so neither held-out split is left empty.
    splits = split_groups(_groups(3, 3), val_fraction=0.15, test_fraction=0.15)
    assert Counter(splits.values()) == {"train": 4, "val": 1, "test": 1}


def test_split_groups_stratifies_by_stratum_within_a_label() -> None:
    # 20 "normal" and 5 "benign" groups, all label 0: per-stratum splitting gives every split
    # some benign groups; a label-only split could leave them all in train.
    labels = {f"n{i}": 0 for i in range(20)} | {f"b{i}": 0 for i in range(5)}
    strata = {g: "benign" if g.startswith("b") else "normal" for g in labels}
    for seed in range(5):
        splits = split_groups(
            labels, group_strata=strata, val_fraction=0.2, test_fraction=0.2, seed=seed
        )
        benign = Counter(s for g, s in splits.items() if strata[g] == "benign")
        assert benign == {"train": 3, "val": 1, "test": 1}


def test_split_groups_targets_slice_fractions_with_unequal_groups() -> None:
    labels = {f"g{i}": 0 for i in range(30)}
    sizes = {g: (60 if i == 0 else 10) for i, g in enumerate(labels)}
    splits = split_groups(labels, group_sizes=sizes, val_fraction=0.15, test_fraction=0.15)
    slices = Counter()
    for g, s in splits.items():
        slices[s] += sizes[g]
    total = sum(sizes.values())
    assert splits["g0"] == "train"  # the big group goes where most room is
    assert abs(slices["val"] / total - 0.15) < 0.05
    assert abs(slices["test"] / total - 0.15) < 0.05


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_split_groups_rejects_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(InputError, match="fraction"):
        split_groups({"a": 0}, val_fraction=val, test_fraction=test)


def test_assign_splits_keeps_groups_whole() -> None:
    rng = np.random.default_rng(0)
    records = [_record(i, f"p{i // 7}", int(rng.random() < 0.2)) for i in range(140)]
    out = assign_splits(records, val_fraction=0.2, test_fraction=0.2, seed=1)
    check_no_group_leakage(out)
    by_group: dict[str, set[str]] = {}
    for r in out:
        by_group.setdefault(r.group_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_group.values())
    assert {r.split for r in out} == {"train", "val", "test"}
    other_split = "test" if out[0].split != "test" else "val"
    leaked = dataclasses.replace(out[0], sample_id="copy", split=other_split)
    with pytest.raises(InputError, match="leakage"):
        check_no_group_leakage([*out, leaked])


def test_filter_records() -> None:
    records = [
        _record(0, "a", 1, "train", True),
        _record(1, "a", 0, "train"),
        _record(2, "b", -1, "val"),
        _record(3, "c", 1, "test", True),
    ]
    assert [r.sample_id for r in filter_records(records, "train")] == ["s000", "s001"]
    assert len(filter_records(records, ["val", "test"])) == 2
    assert [r.sample_id for r in filter_records(records, require_mask=True)] == ["s000", "s003"]
    assert len(filter_records(records, labels=(0, 1))) == 3
    with pytest.raises(InputError, match="split"):
        filter_records(records, "training")


def test_class_balanced_sampler_draws_labels_equally() -> None:
    records = [_record(i, f"g{i}", int(i < 10)) for i in range(100)]
    sampler = class_balanced_sampler(records, num_samples=4000, seed=0)
    drawn = Counter(records[i].label for i in sampler)
    assert abs(drawn[1] / 4000 - 0.5) < 0.04
    assert list(class_balanced_sampler(records, seed=5)) == list(
        class_balanced_sampler(records, seed=5)
    )
    with pytest.raises(InputError):
        class_balanced_sampler([])


@pytest.fixture
def slice_folder(tmp_path: Path) -> tuple[Path, list[SliceRecord]]:
    rng = np.random.default_rng(0)
    (tmp_path / "slices").mkdir()
    (tmp_path / "masks").mkdir()
    image = rng.random((40, 48)).astype(np.float32)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:20, 12:30] = 1
    np.save(tmp_path / "slices/s000.npy", image)
    np.save(tmp_path / "masks/s000.npy", mask)
    np.save(tmp_path / "slices/s001.npy", rng.random((32, 32)).astype(np.float32))
    records = [_record(0, "a", 1, mask=True), _record(1, "b", 0)]
    return tmp_path, records


def test_slice_dataset_items(slice_folder: tuple[Path, list[SliceRecord]]) -> None:
    root, records = slice_folder
    native = SliceDataset(records, root, image_size=None)[0]
    np.testing.assert_array_equal(native["image"][0].numpy(), np.load(root / "slices/s000.npy"))
    assert native["mask"].sum() == 10 * 18

    ds = SliceDataset(records, root, image_size=(64, 64))
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    # The mask follows the letterbox: 40x48 scales by 4/3 to 53x64 and sits 5 rows down, so
    # rows 10..20 -> 18..31 and columns 12..30 -> 16..40.
    rows = torch.nonzero(item["mask"][0].sum(dim=1)).flatten()
    assert abs(rows.min().item() - 18) <= 1 and abs(rows.max().item() - 31) <= 1
    cols = torch.nonzero(item["mask"][0].sum(dim=0)).flatten()
    assert abs(cols.min().item() - 16) <= 1 and abs(cols.max().item() - 39) <= 1
    assert item["image"][0, :5].max() == 0  # padding rows, not stretched image
    assert item["has_mask"].dtype == torch.bool and item["has_mask"].shape == ()
    assert item["has_mask"]
    assert item["label"].dtype == torch.float32 and item["label"].item() == 1.0
    assert item["sample_id"] == "s000" and item["group_id"] == "a"
    empty = ds[1]
    assert not empty["has_mask"] and empty["mask"].sum() == 0 and empty["label"].item() == 0.0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["has_mask"].tolist() == [True, False]


def test_slice_dataset_applies_augment(slice_folder: tuple[Path, list[SliceRecord]]) -> None:
    root, records = slice_folder
    seen = []

    def flip(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen.append((image.shape, image.dtype, mask.shape))
        return image[:, :, ::-1] * 2.0, mask[:, :, ::-1]

    plain = SliceDataset(records, root, image_size=(40, 48))[0]
    item = SliceDataset(records, root, image_size=(40, 48), augment=flip)[0]
    assert seen == [((1, 40, 48), np.float32, (1, 40, 48))]
    torch.testing.assert_close(item["image"], (plain["image"].flip(-1) * 2).clamp(0, 1))
    assert torch.equal(item["mask"], plain["mask"].flip(-1))


def test_slice_dataset_reports_missing_files(slice_folder: tuple[Path, list[SliceRecord]]) -> None:
    root, records = slice_folder
    (root / "masks/s000.npy").unlink()
    with pytest.raises(MissingInputError, match="s000"):
        SliceDataset(records, root)[0]
    with pytest.raises(InputError, match="image_size"):
        SliceDataset(records, root, image_size=(0, 10))


def test_balanced_sampler_does_not_overdraw_unknown_labels() -> None:
    from lungcad.data.dataset import class_balanced_sampler
    from lungcad.data.manifest import SliceRecord

    def rec(i: int, label: int) -> SliceRecord:
        return SliceRecord(
            sample_id=f"s{i}",
            group_id="g",
            slice_index=i,
            image_path=f"slices/s{i}.npy",
            mask_path="",
            label=label,
            spacing_y=1.0,
            spacing_x=1.0,
            source="t",
            split="train",
        )

    records = [rec(i, 0) for i in range(80)] + [rec(80 + i, 1) for i in range(16)]
    records += [rec(96 + i, -1) for i in range(4)]
    weights = class_balanced_sampler(records).weights
    pairs = list(zip(weights.tolist(), records, strict=True))
    mass = {lab: sum(w for w, r in pairs if r.label == lab) for lab in (0, 1, -1)}
    total = sum(mass.values())
    assert mass[0] / total == pytest.approx(0.48)
    assert mass[1] / total == pytest.approx(0.48)
    assert mass[-1] / total == pytest.approx(0.04)


def test_slice_dataset_at_one_pixel_size_shows_objects_at_their_physical_size(
    tmp_path: Path,
) -> None:
    """With ``pixel_mm`` a 20 mm disc is 10 model pixels across at 2 mm per pixel, whether
    the slice has 0.5 mm or 1.5 mm pixels (letterboxed, its size follows the field of
    view: 15 and 10 pixels); slices without a spacing are refused."""
    (tmp_path / "slices").mkdir()
    (tmp_path / "masks").mkdir()
    records = []
    for i, (side, spacing) in enumerate(((256, 0.5), (128, 1.5))):  # 128 and 192 mm
        yy, xx = np.mgrid[:side, :side]
        disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (10.0 / spacing) ** 2
        np.save(tmp_path / f"slices/s{i:03d}.npy", disc.astype(np.float32) * 0.9)
        np.save(tmp_path / f"masks/s{i:03d}.npy", disc.astype(np.uint8))
        records.append(_record(i, f"g{i}", label=1, mask=True, spacing=spacing))
    ds = SliceDataset(records, tmp_path, image_size=(96, 96), pixel_mm=2.0)
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == (1, 96, 96)
        width = int(item["mask"][0].any(dim=0).sum())
        assert abs(width - 10) <= 1
        assert abs(float(item["image"][0].sum()) / 0.9 - math.pi * 25) < 10
    letterboxed = SliceDataset(records, tmp_path, image_size=(96, 96))
    widths = [int(letterboxed[i]["mask"][0].any(dim=0).sum()) for i in range(2)]
    assert widths[0] - widths[1] >= 4
    no_spacing = [dataclasses.replace(r, spacing_y=math.nan, spacing_x=math.nan) for r in records]
    with pytest.raises(InputError, match="slice_pixel_mm"):
        SliceDataset(no_spacing, tmp_path, image_size=(96, 96), pixel_mm=2.0)
    with pytest.raises(InputError):
        SliceDataset(records, tmp_path, image_size=(96, 96), pixel_mm=-1.0)
