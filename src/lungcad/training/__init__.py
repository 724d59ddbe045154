"""Training: the run configuration, the epoch loop, losses, checkpoints and DDP helpers.

Modules: ``config`` (dataclass defaults + YAML + ``--set``), ``loop`` (``train``), ``losses``
(BCE + Dice), ``checkpoint`` (run folders, weights-only loading), ``distributed`` (torchrun).
"""
