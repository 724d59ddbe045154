"""Metrics: ``classification`` (scikit-learn based, ECE, the decision threshold),
``segmentation`` (tp/fp/fn counts, Dice, IoU, HD95, lesion detection), ``volumetric``
(per-study 3D Dice, HD95 and lesions, a missed tumour scored) and ``bootstrap``
(patient-group bootstrap confidence intervals).

A package of its own below ``training`` and ``evaluation`` because both use it (the training
loop's validation pass and the evaluation of a run), so imports stay one-way.
"""
