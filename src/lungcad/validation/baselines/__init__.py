"""Traditional-ML baselines: features (``features``) and scikit-learn pipelines (``pipelines``)."""
