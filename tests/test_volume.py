"""Volume geometry: orientation changes are lossless and keep physical positions."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.volume import Volume, orientation_code, reorient, to_canonical, to_source_orientation


def _volume(direction: np.ndarray) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(
        array=rng.normal(size=(4, 5, 6)).astype(np.float32),
        spacing=(2.5, 0.8, 0.7),
        origin=(10.0, -20.0, 30.0),
        direction=direction,
    )


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])],
)
def test_canonical_round_trip_is_exact(direction: np.ndarray) -> None:
    vol = _volume(direction)
    canon = to_canonical(vol)
    assert orientation_code(canon) == "LPS"
    assert canon.meta["source_orientation"] == orientation_code(vol)
    back = to_source_orientation(canon)
    assert back.same_geometry(vol)
    np.testing.assert_array_equal(back.array, vol.array)


def test_reorient_keeps_physical_positions() -> None:
    vol = _volume(np.diag([-1.0, 1.0, -1.0]))  # RPI
    canon = reorient(vol, "LPS")
    # Voxel (z, y, x) = (1, 2, 3) in the source sits at flipped x and z in LPS order.
    src = vol.index_to_physical([[1, 2, 3]])
    dst = canon.index_to_physical([[4 - 1 - 1, 2, 6 - 1 - 3]])
    np.testing.assert_allclose(src, dst)
    assert canon.array[2, 2, 2] == vol.array[1, 2, 3]


def test_sitk_round_trip_and_voxel_volume() -> None:
    vol = _volume(np.eye(3))
    again = Volume.from_sitk(vol.to_sitk())
    assert again.same_geometry(vol)
    assert vol.voxel_volume_ml == pytest.approx(2.5 * 0.8 * 0.7 / 1000)


def test_invalid_volumes_are_refused() -> None:
    with pytest.raises(ValueError, match="3D"):
        Volume(array=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="intensity"):
        Volume(array=np.zeros((1, 4, 4), np.float32), intensity="rgb")
    with pytest.raises(ValueError, match="spacing"):
        Volume(array=np.zeros((1, 4, 4), np.float32), spacing=(0.0, 1.0, 1.0))
