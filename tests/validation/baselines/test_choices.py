"""lungcad.validation.baselines.choices: the value sets the baselines check and the CLI offers."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.validation.baselines.choices import FEATURE_KINDS, MODEL_NAMES, ROI_KINDS, SCORINGS
from lungcad.validation.baselines.features import slice_roi
from lungcad.validation.baselines.pipelines import make_pipeline


def test_every_model_name_builds_a_pipeline() -> None:
    assert MODEL_NAMES == ("logreg", "svm", "rf", "gb", "knn")
    for name in MODEL_NAMES:
        assert make_pipeline(name).steps[-1][0] == "clf"
    with pytest.raises(KeyError, match="valid names"):
        make_pipeline("deepnet")


def test_rois_and_feature_kinds() -> None:
    image = np.full((32, 32), 0.5, np.float32)
    assert slice_roi(image, "whole")[0].all()
    with pytest.raises(InputError, match="roi must be one of"):
        slice_roi(image, "body")
    assert set(ROI_KINDS) == {"lung", "mask", "whole"}
    assert FEATURE_KINDS == ("handcrafted", "radiomics", "both")
    assert SCORINGS == ("roc_auc", "mcc")


def test_validate_offers_every_roi_but_the_label_leaking_mask(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["validate", "--out", "o", "--roi", "mask"])
    assert "{lung,whole}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["baselines", "--train", "t", "--out", "o", "--features", "deep"])
    assert "{" + ",".join(FEATURE_KINDS) + "}" in capsys.readouterr().err


def test_importing_them_imports_nothing_heavy(modules_imported_by) -> None:
    # The CLI builds every parser on each call; this module must not slow that down.
    assert not modules_imported_by("lungcad.validation.baselines.choices") & {"numpy", "sklearn"}
