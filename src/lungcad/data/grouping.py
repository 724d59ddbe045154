"""Patient groups for scan-ordered 2D sets, found from the images themselves.

2D sets such as IQ-OTH/NCCD have no patient ids. Their files are numbered roughly in scan
order, so a patient is a run of consecutive files, but runs have no fixed length and the same
image can recur far away. Fixed-size blocks of file numbers therefore cut patients in two (one
half in train, the other in test) and miss duplicates, which inflates validation scores.

Here a run ends where the images stop resembling each other:

1. every image becomes a small normalised thumbnail (:func:`thumbnail`) and a 64-bit
   perceptual hash (:func:`perceptual_hash`, the DCT hash of Zauner 2010, as in ``imagehash``);
2. consecutive files are *linked* when any pair of files at most ``window`` apart across the
   cut has a thumbnail correlation of at least ``min_similarity``; a cut with no link, or where
   the image size changes (one acquisition has one matrix), starts a new group
   (:func:`scan_runs`). Erring towards linking keeps a patient whole: an over-merged group only
   makes a split coarser, an over-split one leaks;
3. near-duplicates (hash distance at most ``max_hash_distance`` bits, which also catches
   re-encoded or slightly shifted copies, not only identical bytes) join their groups wherever
   they are (:func:`near_duplicate_pairs`).

:func:`purge_split_boundaries` then keeps groups of different splits apart: at each boundary
between neighbouring runs that land in different splits, the ``gap`` files of the training-side
run nearest the boundary are left out, in case the boundary sits a slice or two off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.fft import dctn

from lungcad.data.layouts.settings import GroupingSettings
from lungcad.data.preprocessing import resize_slice
from lungcad.errors import InputError

#: Side of the thumbnails compared between neighbouring files (pixels).
THUMBNAIL_SIZE = 64
#: Side of the image the perceptual hash is computed on, and of its low-frequency block.
_HASH_IMAGE, _HASH_BLOCK = 32, 8


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A ``(THUMBNAIL_SIZE, THUMBNAIL_SIZE)`` float32 thumbnail with zero mean and unit variance.

    The image is squashed to a square on purpose: neighbours of one scan share a size, and a
    size change is a cut of its own (:func:`scan_runs`).

    Args:
        image: ``(H, W)`` slice, any intensity scale.
    """
    small = resize_slice(np.asarray(image, np.float32), (THUMBNAIL_SIZE, THUMBNAIL_SIZE), order=1)
    return ((small - small.mean()) / (small.std() + 1e-6)).astype(np.float32)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 copy, above their median.

    Robust to re-encoding, small shifts and intensity changes; two copies of one image differ
    in a few bits at most, different slices in about half of them.
    """
    small = resize_slice(np.asarray(image, np.float32), (_HASH_IMAGE, _HASH_IMAGE), order=1)
    low = dctn(small, norm="ortho")[:_HASH_BLOCK, :_HASH_BLOCK].ravel()
    bits = low > np.median(low)
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hash_distance(a: int, b: int) -> int:
    """Number of differing bits between two perceptual hashes."""
    return (a ^ b).bit_count()


def boundary_similarity(thumbs: np.ndarray, cut: int, window: int) -> float:
    """Largest correlation between files on either side of the cut after file ``cut``.

    Args:
        thumbs: ``(n, T, T)`` thumbnails from :func:`thumbnail`, in scan order.
        cut: index of the last file before the cut (``0 <= cut < n - 1``).
        window: files at most this far apart are compared.
    """
    n = len(thumbs)
    flat = thumbs.reshape(n, -1)
    best = -1.0
    for i in range(max(0, cut - window + 1), cut + 1):
        for j in range(cut + 1, min(n, i + window + 1)):
            best = max(best, float(flat[i] @ flat[j]) / flat.shape[1])
    return best


def scan_runs(
    thumbs: np.ndarray, shapes: Sequence[tuple[int, ...]], settings: GroupingSettings
) -> tuple[list[int], list[float]]:
    """Split scan-ordered files into runs of one acquisition.

    Args:
        thumbs: ``(n, T, T)`` thumbnails in scan order.
        shapes: the ``(H, W)`` size of each original image.
        settings: window and similarity threshold.

    Returns:
        ``(run index per file, similarity at each of the n - 1 cuts)``; runs are numbered
        0, 1, ... in scan order.
    """
    n = len(thumbs)
    if len(shapes) != n:
        raise InputError(f"{len(shapes)} shapes for {n} thumbnails", "shapes")
    runs = [0] * n
    similarity: list[float] = []
    for cut in range(n - 1):
        score = boundary_similarity(thumbs, cut, settings.window)
        similarity.append(score)
        new_run = tuple(shapes[cut]) != tuple(shapes[cut + 1]) or score < settings.min_similarity
        runs[cut + 1] = runs[cut] + int(new_run)
    return runs, similarity


def near_duplicate_pairs(hashes: Sequence[int], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``max_distance`` bits.

    Quadratic in the number of files (about 0.3 s for 1,000 files), which suits 2D sets.
    """
    if max_distance < 0:
        return []
    values = np.array([[h >> 32, h & 0xFFFFFFFF] for h in hashes], dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        x = values[i + 1 :] ^ values[i]
        bits = _popcount(x[:, 0]) + _popcount(x[:, 1])
        pairs += [(i, i + 1 + int(k)) for k in np.flatnonzero(bits <= max_distance)]
    return pairs


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (holding at most 32 bits) in ``x``."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x55555555))
    x = (x & np.uint64(0x33333333)) + ((x >> np.uint64(2)) & np.uint64(0x33333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F)
    return ((x * np.uint64(0x01010101)) & np.uint64(0xFFFFFFFF)) >> np.uint64(24)


def purge_split_boundaries(
    order: Sequence[Sequence[int]], groups: Sequence[str], splits: dict[str, str], gap: int
) -> set[int]:
    """Files to leave out so that groups of different splits are ``gap`` files apart.

    Args:
        order: for each scan-ordered sequence (e.g. a class folder), its file indices in scan
            order.
        groups: group id of each file (indexed like ``order``'s entries).
        splits: group id -> split (``"train"``, ``"val"``, ``"test"``, or a fold name).
        gap: files to drop per boundary, from the training side (the side whose split sorts
            first when neither is ``"train"``).

    Returns:
        The file indices to leave out of the manifest.
    """
    dropped: set[int] = set()
    if gap <= 0:
        return dropped
    for sequence in order:
        seq = list(sequence)
        for k in range(len(seq) - 1):
            a, b = seq[k], seq[k + 1]
            split_a, split_b = splits[groups[a]], splits[groups[b]]
            if groups[a] == groups[b] or split_a == split_b:
                continue
            train_side_first = split_a == "train" or (split_b != "train" and split_a < split_b)
            if train_side_first:  # the run before the boundary gives up its last files
                side = [i for i in seq[max(0, k + 1 - gap) : k + 1] if groups[i] == groups[a]]
            else:  # the run after the boundary gives up its first files
                side = [i for i in seq[k + 1 : k + 1 + gap] if groups[i] == groups[b]]
            dropped.update(side)
    return dropped
