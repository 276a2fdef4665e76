import pytest

from histolens.config import RunConfig, load_yaml_overrides, recipe_config
from histolens.errors import ConfigError


def test_original_recipe_is_the_student_projects():
    cfg = recipe_config("original")
    assert cfg.model.backbone == "vgg16"
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum) == ("sgd", 1e-4, 0.9)
    assert (cfg.train.batch_size, cfg.train.epochs) == (32, 50)
    a = cfg.augment
    assert (a.rotation, a.shift, a.shear, a.zoom, a.hflip, a.vflip, a.fill) == (
        20.0,
        0.2,
        0.2,
        0.2,
        True,
        True,
        "nearest",
    )
    assert cfg.train.class_weights


def test_overrides_and_round_trip(tmp_path):
    cfg = RunConfig().override({"train.lr": 0.5, "model": {"backbone": "resnet50"}})
    assert cfg.train.lr == 0.5 and cfg.model.backbone == "resnet50"
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\naugment:\n  rotation: 5\n")
    cfg2 = cfg.override(load_yaml_overrides(tmp_path / "c.yaml"))
    assert cfg2.train.epochs == 3 and cfg2.augment.rotation == 5


def test_mistyped_names_suggest_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        RunConfig().override({"train.epoch": 3})
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        RunConfig().override({"trian.lr": 3})
    with pytest.raises(ConfigError, match="Did you mean 'macenko'"):
        RunConfig().override({"stain.method": "macenco"})
    with pytest.raises(ConfigError, match="must be positive"):
        RunConfig().override({"train.lr": 0})
