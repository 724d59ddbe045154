"""The fixed value sets of evaluation and calibration, for the library and the command line.

The evaluation modules check their arguments against these tuples and ``lungcad evaluate`` /
``lungcad calibrate`` offer them as ``choices``. Nothing is imported here, so building the
command-line parser (``lungcad --help``) stays fast.
"""

from __future__ import annotations

#: Rows of a manifest an evaluation can score ("all": every row, e.g. an external set).
SPLIT_CHOICES = ("train", "val", "test", "all")
#: Probability calibrations: temperature scaling (one parameter) or isotonic regression.
CALIBRATION_METHODS = ("temperature", "isotonic")
