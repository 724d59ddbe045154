"""The fixed value sets of data preparation: layouts, slice selection modes, 2D groupings.

Nothing heavy is imported here, so the command line can offer them as ``choices`` without
loading the readers (``lungcad --help`` stays fast). :mod:`lungcad.data.layouts.common` checks
``PrepareSettings`` against them.
"""

from __future__ import annotations

#: Dataset layouts ``lungcad prepare`` reads (``"auto"`` detects one).
LAYOUTS = ("msd", "luna16", "classfolders", "imagemask")
#: Which slices of 3D sets are kept (see ``PrepareSettings.slices``).
SLICE_MODES = ("tumour", "all", "lung")
#: How 2D sets without patient ids are grouped (see :mod:`lungcad.data.layouts.images2d`).
GROUPINGS = ("similarity", "blocks")
