"""Validation protocols: internal vs external sets, the generalisation gap, baselines.

Modules: ``protocol`` (``run_validation``: train on one site, evaluate internally and
externally), ``folds`` (grouped stratified k folds and out-of-fold metrics), ``gap`` (the gap
table), ``baselines/`` (handcrafted and radiomics features, scikit-learn pipelines),
``report`` (the HTML report of a run, evaluation or validation folder).
"""
