"""Networks: the two-stage LungCADNet (ResNet U-Net + cancer MLP), its registry and weights.

Modules: ``registry`` (``MODELS``, ``create_model``, ``check_model_name``, ``model_summary``),
``unet`` (encoder, decoder, LungCADNet), ``classifier`` (the MLP head and mask summary),
``pretrained`` (ImageNet encoder weights), ``forward`` (the evaluation-time forward pass:
autocast, float32 logits, probabilities; shared by training, evaluation and inference).
"""
