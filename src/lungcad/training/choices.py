"""The fixed value sets of a training configuration: Literal types and their values.

:mod:`lungcad.training.config` annotates its fields with these types, so a value outside the
set fails when the config is loaded, with a message listing the valid ones; the command line
offers the tuples as ``choices``. Nothing heavy is imported here, so ``lungcad --help`` stays
fast. Model names are not a fixed set: they are the keys of
``lungcad.models.registry.MODELS``; the monitorable metrics are defined by the validation pass
(``lungcad.training.validate.MONITORABLE_METRICS``).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEVICES",
    "SCHEDULES",
    "STAGES",
    "THRESHOLD_METHODS",
    "Device",
    "Schedule",
    "Stage",
    "ThresholdMethod",
]

#: "seg": the U-Net on slices with tumour masks; "cls": the cancer classifier on labels.
Stage = Literal["seg", "cls"]
#: "auto": CUDA when torch sees a GPU, else the CPU.
Device = Literal["auto", "cpu", "cuda"]
#: Learning-rate schedule (see ``OptimConfig.schedule``).
Schedule = Literal["cosine", "plateau"]
#: How the classifier's decision threshold is chosen on validation
#: (``lungcad.metrics.classification.choose_threshold``).
ThresholdMethod = Literal["mcc", "youden"]

STAGES: tuple[Stage, ...] = get_args(Stage)
DEVICES: tuple[Device, ...] = get_args(Device)
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
THRESHOLD_METHODS: tuple[ThresholdMethod, ...] = get_args(ThresholdMethod)
