"""lungcad: lung-cancer CAD for chest CT.

Two stages after Cancer Reports 2025 (doi:10.1002/cnr2.70240): a U-Net with a ResNet50 encoder
segments tumours on axial CT slices, and an MLP on the encoder features plus a summary of the
predicted mask says whether the slice (and the study) is cancerous.

The library never prints and never configures logging; only the CLI entry points do.
"""

__version__ = "0.1.0"
