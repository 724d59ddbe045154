"""Config: dataclass defaults, YAML overrides, --set overrides, strict keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.errors import InputError, MissingInputError
from lungcad.models.registry import MODELS
from lungcad.training.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    config_to_yaml,
    diff_configs,
    load_config,
)
from lungcad.training.validate import MONITORABLE_METRICS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_file() -> None:
    assert load_config() == Config()
    assert load_config(None, []) == Config()


def test_yaml_then_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  epochs: 3\nmodel:\n  name: resnet18\n")
    cfg = load_config(
        path,
        [
            "optim.lr=1e-3",
            "train.seed=7",
            "data.manifest=[a.csv, b.csv]",
            "train.init_from=null",
            "train.amp=false",
        ],
    )
    assert cfg.optim.lr == 1e-3  # --set wins over the file; "1e-3" (a YAML string) -> float
    assert cfg.optim.epochs == 3 and cfg.model.name == "resnet18"
    assert cfg.train.seed == 7 and cfg.train.amp is False and cfg.train.init_from is None
    assert cfg.data.manifest == ["a.csv", "b.csv"]
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default
    # A single value where a list is expected becomes a one-item list; ints are valid floats.
    cfg = load_config(None, ["data.manifest=one.csv", "optim.lr=1"])
    assert cfg.data.manifest == ["one.csv"] and cfg.optim.lr == 1.0
    assert isinstance(cfg.optim.lr, float)


def test_unknown_keys_name_the_key_and_list_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"optim\.lrr.*valid keys.*\blr\b.*weight_decay"):
        load_config(None, ["optim.lrr=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  seed: 1\n")
    with pytest.raises(InputError, match=r"trian.*valid keys at the top level: model, data"):
        load_config(path)
    with pytest.raises(InputError, match="section 'model'"):
        load_config(None, ["model=resnet18"])
    with pytest.raises(InputError, match="key=value"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("train.amp=maybe", "train.amp"),
        ("train.stage=detect", "train.stage"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.lr=fast", "optim.lr"),
        ("data.batch_size=true", "data.batch_size"),
        ("data.manifest={a: 1}", "data.manifest"),
        ("model.image_size=65", "model.image_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.monitor=val_accuracy", "optim.monitor"),
        ("model.name=resnet19", "model.name"),
        ("train.device=gpu", "train.device"),
        ("train.threshold_method=f1", "train.threshold_method"),
    ],
)
def test_wrong_types_and_ranges_fail(override: str, key: str) -> None:
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(listed)


def test_yaml_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=0.002", "data.manifest=x.csv", "train.stage=cls"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg) == config_hash(config_to_dict(cfg))
    assert len(config_hash(cfg)) == 64
    other = apply_overrides(cfg, {"train": {"seed": 1}})
    assert config_hash(other) != config_hash(cfg)
    assert diff_configs(cfg, other) == {"train.seed": (42, 1)}
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_apply_overrides_keeps_paths_verbatim() -> None:
    cfg = apply_overrides(
        Config(), {"train": {"out_dir": "runs/a: b"}, "data": {"manifest": ["x"]}}
    )
    assert cfg.train.out_dir == "runs/a: b" and cfg.data.manifest == ["x"]
    with pytest.raises(InputError, match="train.seed"):
        apply_overrides(Config(), {"train": {"seed": "x"}})


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.train.stage in name


def test_model_name_typo_lists_the_registry_names() -> None:
    with pytest.raises(InputError) as info:
        load_config(None, ["model.name=resnet19"])
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert str(info.value) == (
        f"model.name: unknown model 'resnet19'; valid names: {', '.join(sorted(MODELS))}"
    )


def test_monitor_accepts_every_metric_the_validation_pass_offers() -> None:
    for stage, names in MONITORABLE_METRICS.items():
        for name in names:
            assert load_config(None, [f"train.stage={stage}", f"optim.monitor={name}"])
    with pytest.raises(InputError, match=r"valid: auto, val_dice, val_dice_global, val_mcc"):
        load_config(None, ["optim.monitor=val_loss"])  # lower is better: not monitorable


def test_model_selection_is_best_or_last() -> None:
    assert load_config(None, ["optim.select=last"]).optim.select == "last"
    with pytest.raises(InputError, match="optim.select"):
        load_config(None, ["optim.select=first"])
