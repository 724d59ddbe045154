"""Networks: the two-stage LungCADNet (ResNet U-Net + cancer MLP), its registry and weights.

Modules: ``registry`` (``create_model``, ``MODELS``), ``unet`` (encoder, decoder, LungCADNet),
``classifier`` (the MLP head and mask summary), ``pretrained`` (ImageNet encoder weights).
"""
