"""Fold ensembles: the k runs of a cross-validation used as one model (as nnU-Net does).

Here, beside the checkpoint loader, so evaluation and inference load both the same way
(:func:`load_model`).

``lungcad validate --folds K --out CV`` writes ``CV/ensemble.json`` beside ``CV/fold<i>/run``.
That folder is accepted wherever a run folder is (``--checkpoint CV``): the members' tumour
and cancer probabilities are averaged, and the decision threshold is the ensemble's own,
chosen on the pooled out-of-fold probabilities (each patient once).

:class:`EnsembleNet` returns the logit of the mean probability, so everything downstream of
the network (sigmoid, thresholds, lesions, reports) works unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungcad.errors import InputError, MissingInputError
from lungcad.models.tta import mean_probability_logits
from lungcad.models.unet import LungCADNet
from lungcad.training.checkpoint import load_checkpoint
from lungcad.training.config import Config

ENSEMBLE_FILE = "ensemble.json"
#: Written by ``lungcad validate --folds`` beside ``ensemble.json``: the cross-validated manifest.
FOLDS_FILE = "folds.json"


def is_ensemble(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an ``ensemble.json``."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


class EnsembleNet(nn.Module):
    """Several LungCADNets of one configuration; outputs are logits of mean probabilities.

    Args:
        members: the fold models (same architecture and input size).
    """

    def __init__(self, members: list[LungCADNet]) -> None:
        super().__init__()
        if not members:
            raise InputError("an ensemble needs at least one member", "members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 1, H, W)`` -> ``{"seg_logits": (B, 1, H, W), "cls_logits": (B,)}``."""
        return mean_probability_logits([member(x) for member in self.members])

    @property
    def first(self) -> LungCADNet:
        """The first member (Grad-CAM explains this one: a CAM of an average is not defined)."""
        member = self.members[0]
        assert isinstance(member, LungCADNet)  # built only from LungCADNets in __init__
        return member


def load_ensemble(
    folder: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[EnsembleNet, Config, dict[str, Any]]:
    """Load ``folder/ensemble.json`` and its member runs.

    Returns:
        ``(model, config, info)``: the config is the first member's (all members must share
        model name and input size); ``info`` is the first member's checkpoint info with the
        ensemble's threshold and an ``"ensemble"`` entry (members, their checkpoint hashes).

    Raises:
        MissingInputError: ``ensemble.json`` or a member run is missing.
        InputError: the members differ in architecture, input size or stage.
    """
    folder = Path(folder)
    path = folder / ENSEMBLE_FILE
    if not path.is_file():
        raise MissingInputError("no ensemble.json in this folder", folder)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        entries = list(spec["members"])
        threshold = float(spec["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"ensemble.json is not a lungcad ensemble ({exc})", path) from exc
    members, configs, infos = [], [], []
    for entry in entries:
        run = (folder / str(entry["run"])).resolve()
        if folder.resolve() not in run.parents:
            raise InputError("an ensemble member must lie inside the ensemble folder", path)
        model, config, info = load_checkpoint(run, map_location=map_location)
        members.append(model)
        configs.append(config)
        infos.append(info)
    if not members:
        raise InputError("ensemble.json lists no members", path)
    first = configs[0]
    for config, entry in zip(configs[1:], entries[1:], strict=True):
        same = (config.model.name, config.model.image_size, config.train.stage) == (
            first.model.name,
            first.model.image_size,
            first.train.stage,
        )
        if not same:
            raise InputError(
                f"ensemble member {entry['run']} differs from the first in model, input size "
                "or stage; members must share one configuration",
                path,
            )
    info = dict(infos[0])
    info["threshold"] = threshold
    cross_validated = _cross_validated_rows(folder)
    info["ensemble"] = {
        "folder": folder.name,
        "members": [str(e["run"]) for e in entries],
        "member_sha256": [i.get("sha256") for i in infos],
        "threshold_source": spec.get("threshold_source", "ensemble.json"),
        "threshold_method": (spec.get("config") or {}).get("train", {}).get("threshold_method"),
        # The threshold was chosen on the pooled out-of-fold predictions of every labelled row
        # of the cross-validated manifest, and every one of those rows trained some member.
        "threshold_chosen_on": cross_validated,
        "trained_on": cross_validated,
        "aggregation": "mean probability",
    }
    return EnsembleNet(members).eval(), first, info


def _cross_validated_rows(folder: Path) -> dict[str, Any] | None:
    """The rows a cross-validation used, from ``folds.json`` beside ``ensemble.json``:
    ``{"manifests": [{"path", "sha256"}], "split": "all"}`` (every split: the folds ignore the
    manifest's own), or None when the folder has no readable ``folds.json``."""
    try:
        folds = json.loads((folder / FOLDS_FILE).read_text(encoding="utf-8"))
        manifest = {"path": str(folds["manifest"]), "sha256": str(folds["manifest_sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"manifests": [manifest], "split": "all"}


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[LungCADNet | EnsembleNet, Config, dict[str, Any]]:
    """A run folder (or ``.pt``) or a fold-ensemble folder, as ``(model, config, info)``."""
    if is_ensemble(path):
        return load_ensemble(path, map_location=map_location)
    model, config, info = load_checkpoint(path, map_location=map_location)
    return model, config, info
