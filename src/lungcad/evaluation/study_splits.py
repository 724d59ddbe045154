"""Which studies a model trained on: a study folder's cases in the splits of the run's manifests.

When a study folder is the very dataset a run's training manifest was prepared from (``lungcad
prepare --data MSD``, then ``lungcad train``), its cases already have patient-level splits:
training used ``train``, the slice threshold was chosen on ``val`` and ``test`` was held out.
Whole-study work must keep to them: the study threshold is chosen on the ``val`` cases (never
on ``test``, the split results are reported on), and an evaluation scores the ``test`` cases.
The folder is recognised by the prepared folder's ``summary.json``: the same layout and the same
input-file hash (paths and sizes, :func:`lungcad.data.layouts.prepare.input_files_hash`); the
split of each case is its group's (``group_ids``). A study folder that no training manifest was
prepared from holds other patients, and every study in it is used.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungcad.data.layouts.prepare import input_files_hash
from lungcad.data.manifest import manifest_csv
from lungcad.errors import InputError
from lungcad.evaluation.study_data import StudySet

__all__ = ["StudySplits", "select_studies", "training_splits"]


@dataclass(frozen=True)
class StudySplits:
    """The splits of a study folder's cases in a training manifest prepared from it.

    Attributes:
        manifest: the training manifest (as the run recorded it).
        splits: case id -> "train", "val" or "test".
        every_split_trained: True for a fold ensemble, whose members trained on every split.
    """

    manifest: str
    splits: dict[str, str]
    every_split_trained: bool = False


def _summary(manifest: str) -> dict[str, Any] | None:
    try:
        folder = manifest_csv(Path(manifest)).parent
        return dict(json.loads((folder / "summary.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, InputError, TypeError):
        return None  # moved or deleted since training: the folder cannot be matched


def training_splits(
    studies: StudySet, manifests: Sequence[Mapping[str, Any]], *, every_split_trained: bool = False
) -> StudySplits | None:
    """The splits of ``studies`` in the first of ``manifests`` that was prepared from them.

    Args:
        studies: the study folder.
        manifests: the model's training manifests (``{"path", "sha256"}`` as ``run.json``
            records them).
        every_split_trained: the model is a fold ensemble (every split trained a member).

    Returns:
        The :class:`StudySplits`, or None when no manifest was prepared from this folder (or
        none can be found any more).
    """
    folder = studies.folder
    files = [folder / "dataset.json"] + [p for s in studies.studies for p in (s.image, s.label)]
    try:
        wanted = input_files_hash(folder, files)
    except (OSError, ValueError):
        return None
    for entry in manifests:
        summary = _summary(str(entry.get("path", "")))
        if summary and summary.get("layout") == studies.layout:
            if summary.get("input_files_sha256") == wanted:
                splits = {
                    str(group): str(split)
                    for split, groups in (summary.get("group_ids") or {}).items()
                    for group in groups
                }
                return StudySplits(str(entry.get("path")), splits, every_split_trained)
    return None


def select_studies(
    studies: StudySet, found: StudySplits | None, split: str | None, purpose: str
) -> tuple[StudySet, dict[str, Any]]:
    """The studies to use, and what the choice says about them.

    Args:
        studies: the study folder.
        found: :func:`training_splits`.
        split: the split asked for ("train", "val", "test", "all"), or None for the default:
            "val" to choose a threshold, "test" to evaluate (studies the model trained on);
            every study otherwise.
        purpose: ``"threshold"`` (``calibrate --studies``) or ``"evaluate"``.

    Returns:
        ``(selected, provenance)``; ``provenance`` has ``split``, ``training_manifest`` and
        ``overlaps_training_data`` (whether some selected study trained the model).

    Raises:
        InputError: a split for a folder the model did not train on; a threshold on the
            ``test`` split, on every split, or on an ensemble's training studies; no study in
            the split.
    """
    if found is None:
        if split not in (None, "all"):
            raise InputError(
                f"--split {split} selects cases of the run's training manifest, but no "
                "manifest of this model was prepared from these studies (they are other "
                "patients: all of them are used)",
                studies.input,
            )
        return studies, {"split": "all", "training_manifest": None, "overlaps_training_data": False}
    chosen = split or ("val" if purpose == "threshold" else "test")
    if purpose == "threshold":
        if found.every_split_trained:
            raise InputError(
                "every one of these studies trained a member of this fold ensemble; choose its "
                "study threshold on other patients' studies",
                studies.input,
            )
        if chosen in ("test", "all"):
            raise InputError(
                f"the study threshold is never chosen on the {chosen!r} studies: results are "
                "reported on the test split; use --split val",
                "--split",
            )
    keep = tuple(
        s for s in studies.studies if chosen == "all" or found.splits.get(s.case_id) == chosen
    )
    if not keep:
        raise InputError(
            f"no study of this folder is in the {chosen!r} split of {found.manifest}", studies.input
        )
    overlaps = found.every_split_trained or chosen in ("train", "all")
    return dataclasses.replace(studies, studies=keep), {
        "split": chosen,
        "training_manifest": found.manifest,
        "overlaps_training_data": overlaps,
    }
