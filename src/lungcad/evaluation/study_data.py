"""Which 3D studies to evaluate: the cases of an MSD-layout folder, each with its content hash.

A study set is a folder in the Medical Segmentation Decathlon Task06 layout
(``dataset.json``, ``imagesTr/*.nii.gz`` CT volumes in HU, ``labelsTr/*.nii.gz`` tumour
labels, 1 = cancer), such as the ``msd/`` folder that ``lungcad synth`` writes; the cohort
folder above it is accepted too. Each study is identified by the SHA-256 of its image file,
so a study threshold chosen on some studies (:mod:`lungcad.evaluation.study_threshold`) can
be recognised when the same studies are evaluated, whatever folder they were copied to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungcad.data.layouts.common import read_volume
from lungcad.data.layouts.volumes import msd_cases
from lungcad.errors import InputError, MissingInputError
from lungcad.training.checkpoint import file_sha256
from lungcad.volume import Volume

__all__ = ["Study", "StudySet", "open_studies", "read_study"]

STUDY_LAYOUT_HELP = (
    "expected a folder in the MSD Task06 layout (dataset.json, imagesTr/ and labelsTr/ "
    "NIfTI volumes with tumour labels), e.g. the msd/ folder of `lungcad synth --formats msd`"
)


@dataclass(frozen=True)
class Study:
    """One study of a study set.

    Attributes:
        case_id: the case's name (the image's file name without ``.nii(.gz)``); each case is
            one patient, so it is also the bootstrap group.
        image: the CT volume (HU).
        label: its tumour label volume (0/1, same geometry).
        image_sha256: SHA-256 of the image file's bytes (the study's identity).
    """

    case_id: str
    image: Path
    label: Path
    image_sha256: str


@dataclass(frozen=True)
class StudySet:
    """The studies of a folder.

    Attributes:
        input: the path the user gave.
        folder: the MSD folder read (``input`` or its ``msd/`` sub-folder).
        layout: ``"msd"``.
        studies: the studies, in ``dataset.json`` order.
    """

    input: Path
    folder: Path
    layout: str
    studies: tuple[Study, ...]

    @property
    def hashes(self) -> list[str]:
        """The studies' image SHA-256s, in order."""
        return [s.image_sha256 for s in self.studies]


def open_studies(path: str | Path) -> StudySet:
    """List the studies of an MSD-layout folder (or of a cohort folder holding ``msd/``).

    Nothing is read but the file list and the image bytes (for the hashes).

    Raises:
        MissingInputError: ``path`` does not exist, or a listed image or label is missing.
        InputError: the folder is not in the MSD layout, or two cases share a name.
    """
    given = Path(path)
    if not given.exists():
        raise MissingInputError("study folder not found; " + STUDY_LAYOUT_HELP, given)
    folder = next(
        (
            f
            for f in (given, given / "msd")
            if (f / "dataset.json").is_file() and (f / "imagesTr").is_dir()
        ),
        None,
    )
    if folder is None:
        raise InputError("not a 3D study folder; " + STUDY_LAYOUT_HELP, given)
    cases = msd_cases(folder)
    seen: set[str] = set()
    studies = []
    for case_id, image, label in cases:
        if case_id in seen:
            raise InputError(f"two cases are named {case_id!r}", image)
        seen.add(case_id)
        studies.append(Study(case_id, image, label, file_sha256(image)))
    return StudySet(given, folder, "msd", tuple(studies))


def read_study(study: Study) -> tuple[Volume, np.ndarray]:
    """Read a study's CT and its reference tumour mask on the same canonical grid.

    Returns:
        ``(volume, reference)``: the canonical-LPS HU Volume and the bool ``(z, y, x)`` mask.

    Raises:
        InputError: a file cannot be read, or the label's geometry differs from the image's.
    """
    volume = read_volume(study.image)
    label = read_volume(study.label)
    if not volume.same_geometry(label, atol=1e-2):
        raise InputError(
            f"label geometry (shape {label.shape}, spacing {label.spacing}) differs from its "
            f"image's (shape {volume.shape}, spacing {volume.spacing})",
            study.label,
        )
    return volume, np.asarray(label.array) > 0.5
