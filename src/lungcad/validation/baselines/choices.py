"""The fixed value sets of the traditional-ML baselines, for the library and the command line.

:mod:`lungcad.validation.baselines.features` and :mod:`~lungcad.validation.baselines.pipelines`
check their arguments against these tuples; ``lungcad baselines`` and ``lungcad validate``
offer them as ``choices``. Nothing is imported here, so building the command-line parser
(``lungcad --help``) stays fast.
"""

from __future__ import annotations

#: Baseline models: L2 logistic regression, RBF SVM, random forest, gradient boosting, k-NN.
MODEL_NAMES = ("logreg", "svm", "rf", "gb", "knn")
#: Grid-search scores of the patient-grouped cross-validation.
SCORINGS = ("roc_auc", "mcc")
#: Feature families: handcrafted (intensity, GLCM, LBP, ...), pyradiomics, or both.
FEATURE_KINDS = ("handcrafted", "radiomics", "both")
#: Feature regions: the lung mask, the whole slice, or the tumour mask (which leaks the label
#: of a cancer/no-cancer classifier; for analysis only).
ROI_KINDS = ("lung", "mask", "whole")
