"""Evaluation of a trained run on a prepared data set.

Modules: ``evaluate`` (``evaluate_run``: the forward pass and the run), ``data`` (which records
to evaluate), ``scoring`` (metric tables from predictions), ``info`` (the provenance in
``evaluation.json``), ``folder`` (the evaluation folder: its files, writer and reader),
``plots`` (confusion, ROC, calibration, Dice figures), ``calibration`` (temperature / isotonic
calibration and the decision threshold). Whole 3D studies: ``study_data`` (which studies),
``study_splits`` (the cases of a run's own dataset in its splits), ``studies`` (per-study
scores and the study metrics), ``study_folder`` (the study evaluation folder),
``study_threshold`` (the study decision threshold, ``study_threshold.json``).
"""
