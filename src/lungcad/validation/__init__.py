"""Validation protocols: internal vs external sets, the generalisation gap, baselines.

Modules: ``protocol`` (``validate``), ``gap`` (the gap table), ``baselines/`` (handcrafted and
radiomics features, scikit-learn pipelines), ``report`` (the HTML report of a run, evaluation
or validation folder).
"""
