"""Inference on whole studies: the predictor, lesions, explanations, export and study outputs.

Modules: ``predictor`` (``Predictor``, study aggregation), ``lesions`` (connected tumour
components and their measurements), ``explain`` (Grad-CAM), ``export`` (ONNX / TorchScript),
``outputs`` (the files written for a study), ``study_report`` (its HTML page),
``study_evaluation`` (the predictor over 3D studies: study metrics and the study threshold).
"""
