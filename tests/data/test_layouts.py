"""``lungcad prepare`` on small look-alikes of MSD, LUNA16, class-folder and image/mask sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from lungcad.cli import main
from lungcad.data.layouts.images2d import parse_file_number
from lungcad.data.layouts.prepare import detect_layout, prepare_dataset
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.layouts.volumes import nodule_sphere_mask, world_to_index
from lungcad.data.manifest import (
    check_no_group_leakage,
    filter_records,
    group_labels_of,
    read_manifest,
)
from lungcad.data.preprocessing import window_hu
from lungcad.errors import InputError, MissingInputError
from lungcad.volume import Volume, to_canonical

SHAPE = (16, 64, 64)  # z, y, x
TUMOUR_Z = (4, 5, 6)


def _chest(seed: int, tumour: bool) -> tuple[np.ndarray, np.ndarray]:
    """A tiny chest: body (30 HU), two lungs (-850 HU), optional tumour in the right lung."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    body = ((y - 32) / 27) ** 2 + ((x - 32) / 30) ** 2 <= 1
    lungs = np.zeros(SHAPE, bool)
    for cx in (19, 45):
        lungs |= ((y - 31) / 15) ** 2 + ((x - cx) / 9) ** 2 <= 1
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[body] = 30.0
    hu[lungs] = -850.0
    mask = np.zeros(SHAPE, np.uint8)
    if tumour:  # 5x5 pixels on slices 4..6 only
        mask[TUMOUR_Z[0] : TUMOUR_Z[-1] + 1, 28:33, 17:22] = 1
        hu[mask > 0] = 40.0
    return hu + rng.normal(0, 10, SHAPE).astype(np.float32), mask


def _write(
    array: np.ndarray,
    path: Path,
    spacing_xyz=(3.0, 3.0, 2.5),
    origin=(0.0, 0.0, 0.0),
    direction=None,
) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in np.ravel(direction)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def msd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("Task06_Lung")
    training = []
    for i, tumour in enumerate((True, True, False), start=1):
        hu, mask = _chest(i, tumour)
        _write(hu.astype(np.int16), root / f"imagesTr/lung_00{i}.nii.gz")
        _write(mask, root / f"labelsTr/lung_00{i}.nii.gz")
        training.append(
            {"image": f"./imagesTr/lung_00{i}.nii.gz", "label": f"./labelsTr/lung_00{i}.nii.gz"}
        )
    (root / "imagesTr/._lung_001.nii.gz").write_bytes(b"macOS resource fork")
    (root / "dataset.json").write_text(json.dumps({"name": "Lung", "training": training}))
    return root


# LUNA16 look-alike: one scan stored LPS with an odd origin/spacing, one stored RAS (flipped
# x and y), one with rows and columns swapped, each with a 10 mm nodule given in world mm.
LUNA_SCANS = {
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.101": dict(
        spacing_xyz=(2.8, 3.1, 2.5),
        origin=(-95.5, -110.25, -312.0),
        direction=np.eye(3),
        nodule_index_xyz=(20.3, 30.0, 7.6),
    ),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.202": dict(
        spacing_xyz=(3.2, 2.9, 2.0),
        origin=(140.0, 90.0, -250.0),
        direction=np.diag([-1.0, -1.0, 1.0]),
        nodule_index_xyz=(44.0, 28.5, 10.2),
    ),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.303": dict(
        spacing_xyz=(2.6, 3.4, 2.2),
        origin=(60.0, -80.0, 15.0),
        direction=np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        nodule_index_xyz=(22.0, 41.7, 3.4),
    ),
}


def _nodule_world(scan: dict) -> np.ndarray:
    index = np.asarray(scan["nodule_index_xyz"]) * np.asarray(scan["spacing_xyz"])
    return scan["direction"] @ index + np.asarray(scan["origin"])


@pytest.fixture(scope="module")
def luna_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("luna16")
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    for i, (uid, scan) in enumerate(LUNA_SCANS.items()):
        hu, _ = _chest(10 + i, tumour=False)
        _write(
            hu.astype(np.int16),
            root / f"subset{i}/{uid}.mhd",
            scan["spacing_xyz"],
            scan["origin"],
            scan["direction"],
        )
        x, y, z = _nodule_world(scan)
        rows.append(f"{uid},{x},{y},{z},10.0")
    rows.append("1.3.6.1.4.1.14519.5.2.1.6279.6001.999,1,2,3,5.0")  # scan not downloaded
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return root


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path, quality=90)


CLASS_COUNTS = {"Malignant cases": 30, "Normal cases": 25, "Bengin cases": 6}
CLASS_ARGS = ["--positive", "Malignant cases", "--negative", "Normal cases,Bengin cases"]


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    root = tmp_path / "iq"
    for k, (folder, n) in enumerate(CLASS_COUNTS.items()):
        stem = folder.split()[0] + " case"
        for i in range(1, n + 1):
            _jpeg(root / folder / f"{stem} ({i}).jpg", 1000 * k + i)
    # Exact duplicate in another block: block 1-10 and block 21-30 must merge.
    shutil.copyfile(
        root / "Malignant cases/Malignant case (3).jpg",
        root / "Malignant cases/Malignant case (27).jpg",
    )
    return root


@pytest.fixture
def imagemask_dir(tmp_path: Path) -> Path:
    root = tmp_path / "patches"
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(25):
        image = rng.integers(0, 65535, (48, 48), dtype=np.uint16)
        mask = np.zeros((48, 48), np.uint8)
        if i % 3:
            mask[10:20, 5 + i : 15 + i] = 255
        Image.fromarray(image).save(root / f"images/patch_{i:03d}.png")
        Image.fromarray(mask).save(root / f"masks/patch_{i:03d}.png")
    return root


def test_detect_layout(
    msd_dir: Path, luna_dir: Path, class_dir: Path, imagemask_dir: Path, tmp_path: Path
) -> None:
    assert detect_layout(msd_dir) == "msd"
    assert detect_layout(luna_dir) == "luna16"
    assert detect_layout(class_dir) == "classfolders"
    assert detect_layout(imagemask_dir) == "imagemask"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(MissingInputError):
        detect_layout(tmp_path / "absent")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown dataset layout.*notes.txt.*classfolders"):
        detect_layout(tmp_path / "odd")


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("Malignant case (214).jpg", 214),
        ("patch_007.png", 7),
        ("Bengin case(3) .JPG", 3),
        ("ct2_slice-0045.png", 45),
        ("image.png", None),
    ],
)
def test_parse_file_number(name: str, number: int | None) -> None:
    assert parse_file_number(name) == number


def test_prepare_msd(msd_dir: Path, tmp_path: Path) -> None:
    result = prepare_dataset(msd_dir, tmp_path / "out")
    records = read_manifest(tmp_path / "out/manifest.csv")
    assert records == result.records
    assert {r.group_id for r in records} == {"lung_001", "lung_002", "lung_003"}
    check_no_group_leakage(records)
    for case, tumour in (("lung_001", True), ("lung_002", True), ("lung_003", False)):
        rows = [r for r in records if r.group_id == case]
        positives = sorted(r.slice_index for r in rows if r.label == 1)
        assert positives == (list(TUMOUR_Z) if tumour else [])
        assert len(rows) == len(positives) + 8  # min_negatives non-tumour lung slices
    for r in records:
        image = np.load(tmp_path / "out" / r.image_path)
        mask = np.load(tmp_path / "out" / r.mask_path)
        assert image.dtype == np.float32 and image.shape == SHAPE[1:]
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.dtype == np.uint8 and int(mask.any()) == r.label
        assert (r.spacing_y, r.spacing_x, r.source) == (3.0, 3.0, "msd:" + msd_dir.name)
    first = next(r for r in records if r.group_id == "lung_001" and r.slice_index == 5)
    image = np.load(tmp_path / "out" / first.image_path)
    lung_value = float(window_hu(np.float32(-850.0)))
    assert abs(float(np.median(image[25:37, 40:50])) - lung_value) < 0.02  # left lung
    assert np.load(tmp_path / "out" / first.mask_path)[28:33, 17:22].all()
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["layout"] == "msd" and summary["counts"]["total"]["slices"] == len(records)
    assert summary["counts"]["total"]["label_1"] == 6 and summary["input_files"] == 7

    everything = prepare_dataset(msd_dir, tmp_path / "all", PrepareSettings(slices="all"))
    assert len(everything.records) == 3 * SHAPE[0]


def test_tiny_tumour_edge_slices_are_unknown_not_cancerous(tmp_path: Path, capsys) -> None:
    # MSD look-alike at 3 x 3 mm pixels: 25-pixel tumour (225 mm^2) on slices 4..6, plus one
    # pixel (9 mm^2) on slice 3 and two (18 mm^2) on slice 7, as at a tumour's tips.
    root = tmp_path / "Task06_Lung"
    hu, mask = _chest(1, tumour=True)
    mask[3, 30, 19] = 1
    mask[7, 30, 19:21] = 1
    _write(hu.astype(np.int16), root / "imagesTr/lung_001.nii.gz")
    _write(mask, root / "labelsTr/lung_001.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "training": [
                    {"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}
                ]
            }
        )
    )

    def labels(result) -> dict[int, int]:
        return {r.slice_index: r.label for r in result.records if r.label != 0}

    default = prepare_dataset(root, tmp_path / "default")
    assert labels(default) == {3: -1, 4: 1, 5: 1, 6: 1, 7: 1}  # 10 mm^2 by default
    tip = next(r for r in default.records if r.slice_index == 3)
    assert np.load(tmp_path / "default" / tip.mask_path).sum() == 1  # mask kept for seg
    assert default.summary["counts"]["total"]["label_-1"] == 1
    assert default.summary["settings"]["min_tumour_area_mm2"] == 10.0
    assert group_labels_of(default.records) == {"lung_001": 1}
    # Stage cls reads labels 0/1 only: the tip is neither a positive nor a negative.
    cls_records = filter_records(default.records, "train", labels=(0, 1))
    assert 3 not in {r.slice_index for r in cls_records}
    assert {r.slice_index for r in cls_records if r.label == 1} == {4, 5, 6, 7}

    assert (
        main(
            [
                "prepare",
                "--data",
                str(root),
                "--out",
                str(tmp_path / "cli"),
                "--min-tumour-area-mm2",
                "20",
            ]
        )
        == 0
    )
    assert "-1 = unknown" in capsys.readouterr().out
    cli = read_manifest(tmp_path / "cli/manifest.csv")
    assert {r.slice_index: r.label for r in cli if r.label != 0} == {3: -1, 4: 1, 5: 1, 6: 1, 7: -1}
    anything = prepare_dataset(root, tmp_path / "zero", PrepareSettings(min_tumour_area_mm2=0))
    assert labels(anything) == {z: 1 for z in range(3, 8)}
    with pytest.raises(InputError, match="min-tumour-area-mm2"):
        PrepareSettings(min_tumour_area_mm2=-1.0)


def test_nodule_sphere_mask_matches_world_coordinates() -> None:
    for scan in LUNA_SCANS.values():
        volume = Volume(
            np.zeros(SHAPE, np.float32),
            spacing=scan["spacing_xyz"][::-1],
            origin=scan["origin"],
            direction=scan["direction"],
        )
        center = _nodule_world(scan)
        np.testing.assert_allclose(
            world_to_index(volume, center)[0], scan["nodule_index_xyz"][::-1], atol=1e-9
        )
        mask = nodule_sphere_mask(volume, center[None], [10.0])
        # Brute force: every voxel centre within 5 mm of the nodule centre.
        zyx = np.indices(SHAPE).reshape(3, -1).T
        inside = np.linalg.norm(volume.index_to_physical(zyx) - center, axis=1) <= 5.0
        np.testing.assert_array_equal(mask.ravel().astype(bool), inside)
        assert mask.sum() > 10


def test_prepare_luna16_puts_nodules_where_the_world_coordinates_say(
    luna_dir: Path, tmp_path: Path
) -> None:
    result = prepare_dataset(luna_dir, tmp_path / "out", PrepareSettings(slices="all"))
    assert any("not among the scans" in w for w in result.summary["warnings"])
    for i, (uid, scan) in enumerate(LUNA_SCANS.items()):
        # Expected geometry straight from SimpleITK, put in lungcad's canonical LPS.
        image = sitk.ReadImage(str(luna_dir / f"subset{i}/{uid}.mhd"))
        canonical = to_canonical(Volume.from_sitk(image))
        center = _nodule_world(scan)
        rows = sorted((r for r in result.records if r.group_id == uid), key=lambda r: r.slice_index)
        assert len(rows) == SHAPE[0]
        mask = np.stack([np.load(tmp_path / "out" / r.mask_path) for r in rows])
        zyx = np.indices(SHAPE).reshape(3, -1).T
        inside = np.linalg.norm(canonical.index_to_physical(zyx) - center, axis=1) <= 5.0
        np.testing.assert_array_equal(mask.ravel().astype(bool), inside.ravel())
        centroid = canonical.index_to_physical(np.argwhere(mask).mean(axis=0))[0]
        assert np.linalg.norm(centroid - center) < 1.5
        # Label 1 from 10 mm^2 of nodule on the slice, -1 for thinner edge discs, 0 without.
        area = mask.sum(axis=(1, 2)) * rows[0].spacing_y * rows[0].spacing_x
        assert [r.label for r in rows] == [0 if a == 0 else 1 if a >= 10 else -1 for a in area]
        assert (rows[0].spacing_y, rows[0].spacing_x) == pytest.approx(canonical.spacing[1:])


def _numbers(records, group: str) -> list[int]:
    return sorted(r.slice_index for r in records if r.group_id == group)


def test_prepare_classfolders_blocks_and_duplicates(class_dir: Path, tmp_path: Path) -> None:
    settings = PrepareSettings(
        positive=("Malignant cases",), negative=("Normal cases", "Bengin cases"), block_size=10
    )
    result = prepare_dataset(class_dir, tmp_path / "out", settings)
    records = result.records
    assert len(records) == sum(CLASS_COUNTS.values())
    assert all(r.mask_path == "" for r in records)
    assert {r.label for r in records if r.sample_id.startswith("Malignant")} == {1}
    assert {r.label for r in records if not r.sample_id.startswith("Malignant")} == {0}
    groups = {r.group_id for r in records}
    assert groups == {
        "Malignant_cases_b000",
        "Malignant_cases_b001",
        "Normal_cases_b000",
        "Normal_cases_b001",
        "Normal_cases_b002",
        "Bengin_cases_b000",
    }
    # The duplicate pair (3, 27) merged blocks 1-10 and 21-30; other blocks are contiguous.
    assert _numbers(records, "Malignant_cases_b000") == [*range(1, 11), *range(21, 31)]
    assert _numbers(records, "Malignant_cases_b001") == list(range(11, 21))
    assert _numbers(records, "Normal_cases_b002") == list(range(21, 26))
    check_no_group_leakage(records)
    assert result.summary["duplicate_files"] == [
        ["Malignant cases/Malignant case (3).jpg", "Malignant cases/Malignant case (27).jpg"]
    ]
    image = np.load(tmp_path / "out" / records[0].image_path)
    assert image.dtype == np.float32 and image.shape == (64, 64)


def test_prepare_imagemask(imagemask_dir: Path, tmp_path: Path) -> None:
    result = prepare_dataset(imagemask_dir, tmp_path / "out")
    records = result.records
    assert len(records) == 25 and sorted({r.group_id for r in records}) == ["b000", "b001", "b002"]
    assert _numbers(records, "b001") == list(range(10, 20))
    for r in records:
        mask = np.load(tmp_path / "out" / r.mask_path)
        assert r.label == int(r.slice_index % 3 != 0) == int(mask.any())
        stored = np.asarray(Image.open(imagemask_dir / f"images/{r.sample_id}.png"))
        np.testing.assert_allclose(
            np.load(tmp_path / "out" / r.image_path), stored / 65535, atol=1e-6
        )


def test_cli_end_to_end(class_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "prep"
    code = main(
        [
            "prepare",
            "--data",
            str(class_dir),
            "--out",
            str(out),
            "--block-size",
            "10",
            "--seed",
            "1",
            *CLASS_ARGS,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for split in ("train", "val", "test", "total"):
        row = summary["counts"][split]
        assert f"{split:<7}{row['label_0']:>10}{row['label_1']:>10}{row['slices']:>10}" in printed
    assert summary["counts"]["total"]["slices"] == 61
    assert summary["settings"]["seed"] == 1 and summary["input"] == str(class_dir.resolve())
    first = (out / "manifest.csv").read_text()
    # Deterministic: the same call gives the same manifest, replacing the old folder.
    assert (
        main(
            [
                "prepare",
                "--data",
                str(class_dir),
                "--out",
                str(out),
                "--block-size",
                "10",
                "--seed",
                "1",
                *CLASS_ARGS,
            ]
        )
        == 0
    )
    assert (out / "manifest.csv").read_text() == first


def _no_output(out: Path) -> bool:
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return not out.exists() and not leftovers


def test_cli_bad_input_writes_nothing(
    class_dir: Path, imagemask_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "results" / "prep"
    out.parent.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = tmp_path / "odd"
    (odd / "docs").mkdir(parents=True)
    (odd / "docs/readme.txt").write_text("x")
    cases = [
        (["--data", str(empty)], "empty"),
        (["--data", str(odd)], "unknown dataset layout"),
        (
            [
                "--data",
                str(class_dir),
                "--positive",
                "Malignant cases",
                "--negative",
                "Normal cases",
            ],
            "Bengin cases",
        ),
        (["--data", str(class_dir)], "--positive"),
    ]
    for args, message in cases:
        assert main(["prepare", "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
        assert _no_output(out)

    (imagemask_dir / "masks/patch_004.png").unlink()
    with pytest.raises(InputError, match="patch_004.png.*no mask"):
        prepare_dataset(imagemask_dir, out)
    assert main(["prepare", "--data", str(imagemask_dir), "--out", str(out)]) == 2
    assert "patch_004.png" in capsys.readouterr().err
    assert _no_output(out)

    (class_dir / "Normal cases/Normal case (12).jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["prepare", "--data", str(class_dir), "--out", str(out), *CLASS_ARGS]) == 2
    assert "Normal case (12).jpg" in capsys.readouterr().err
    assert _no_output(out)


def test_failed_run_keeps_previous_output(imagemask_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare_dataset(imagemask_dir, out)
    before = (out / "manifest.csv").read_text()
    Path(imagemask_dir / "images/patch_020.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="patch_020"):
        prepare_dataset(imagemask_dir, out)
    assert (out / "manifest.csv").read_text() == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="refusing"):
        prepare_dataset(imagemask_dir, other)
    with pytest.raises(InputError, match="replace the input"):
        prepare_dataset(imagemask_dir, imagemask_dir.parent)
