"""Evaluation of a trained run on a prepared data set.

Modules: ``evaluate`` (``evaluate_run``), ``data`` (which records to evaluate), ``scoring``
(metric tables from predictions), ``plots`` (confusion, ROC, calibration, Dice figures),
``calibration`` (temperature / isotonic calibration and the decision threshold).
"""
