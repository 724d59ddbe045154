"""Training: the run configuration, the epoch loop and its parts, checkpoints, DDP helpers.

Modules, from the entry point down:

* ``loop``: ``train(config)``, the epoch loop, early stopping (``EarlyStopping``);
* ``data``: the run's records, samplers and loaders of both splits;
* ``optim``: trainable parts per epoch, AdamW groups, the schedule, the optimisation step;
* ``validate``: the per-epoch validation pass and the metrics ``optim.monitor`` may name;
* ``run_folder``: starting/resuming a run folder and what each epoch writes to it;
* ``checkpoint``: file names, checkpoint save/load (weights-only), initial weights;
* ``losses``: BCE + Dice on masks, BCE on labels;
* ``distributed``: torchrun process groups, sharded sampling, BatchNorm averaging;
* ``config``: the dataclass schema with its defaults and checks, YAML + ``--set`` loading;
* ``overrides``: typed updates of nested dataclasses (the machinery behind ``config``);
* ``choices``: the fixed value sets (stages, devices, schedules, threshold methods).
"""
