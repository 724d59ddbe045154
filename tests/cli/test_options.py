"""lungcad.cli._options: the prepare-settings options that ``prepare`` and ``evaluate`` share,
their defaults (the library's own) and the settings built from them."""

from __future__ import annotations

import argparse

import pytest

from lungcad.cli import build_parser
from lungcad.cli._options import add_prepare_options, comma_separated, prepare_settings
from lungcad.data.choices import LAYOUTS
from lungcad.data.layouts.settings import GroupingSettings, PrepareSettings
from lungcad.errors import InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    add_prepare_options(parser, "dataset")
    return parser


def test_nothing_given_keeps_the_library_defaults() -> None:
    assert prepare_settings(_parser().parse_args([])) == PrepareSettings()


def test_every_option_reaches_the_settings() -> None:
    args = _parser().parse_args(
        [
            "--seed=3",
            "--layout=classfolders",
            "--positive= Malignant cases ,",
            "--negative=Normal cases,Bengin cases",
            "--val-fraction=0.2",
            "--test-fraction=0.1",
            "--grouping=blocks",
            "--block-size=5",
            "--group-window=2",
            "--group-min-similarity=0.7",
            "--group-hash-distance=-1",
            "--group-gap=0",
            "--slices=lung",
            "--negative-ratio=2",
            "--min-negatives=1",
            "--min-tumour-area-mm2=0",
        ]
    )
    assert prepare_settings(args) == PrepareSettings(
        layout="classfolders",
        positive=("Malignant cases",),
        negative=("Normal cases", "Bengin cases"),
        val_fraction=0.2,
        test_fraction=0.1,
        seed=3,
        grouping="blocks",
        grouping_settings=GroupingSettings(
            window=2, min_similarity=0.7, max_hash_distance=-1, gap=0
        ),
        block_size=5,
        slices="lung",
        negative_ratio=2.0,
        min_negatives=1,
        min_tumour_area_mm2=0.0,
    )


def test_choices_are_the_librarys_and_bad_values_name_the_option(capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--layout=dicom"])
    error = capsys.readouterr().err
    assert all(layout in error for layout in LAYOUTS)
    with pytest.raises(InputError, match="--block-size"):
        prepare_settings(_parser().parse_args(["--block-size=0"]))


def test_prepare_and_evaluate_offer_the_same_options() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def dests(name: str) -> set[str]:
        return {a.dest for a in commands[name]._actions}

    shared = {a.dest for a in _parser()._actions} - {"help"}
    assert shared <= dests("prepare") and shared <= dests("evaluate")


def test_comma_separated() -> None:
    assert comma_separated(" a, b ,,c ") == ("a", "b", "c") and comma_separated("") == ()
