"""Typed run configuration: dataclasses are the source of truth; presets, YAML and flags override.

The resolved config is saved with every run (``config.json``) and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolens.errors import ConfigError, check_choice, did_you_mean

__all__ = [
    "ENGINES",
    "AugmentConfig",
    "DataConfig",
    "MLP_HEAD_DIMS",
    "MLP_HEAD_DROPOUTS",
    "ModelConfig",
    "RECIPES",
    "RunConfig",
    "StainConfig",
    "TrainConfig",
    "load_yaml_overrides",
]


@dataclass
class DataConfig:
    """Where the images are and how they are split."""

    path: str = ""
    magnification: str = "all"
    task: str = "binary"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    group_by: str = "group"  # "group": numeric core of the BreakHis id; "patient": exact ids
    # Microns per pixel of the training images (--mpp), recorded in the checkpoint so that
    # whole slides are tiled at the same scale; None: the BreakHis magnification table.
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.mpp is not None:
            self.mpp = float(self.mpp)
            if not (self.mpp > 0 and self.mpp < float("inf")):
                raise ConfigError(f"--mpp must be a positive number of microns, not {self.mpp}.")
        self.magnification = str(self.magnification).upper().rstrip("X").lower()
        check_choice("magnification", self.magnification, ["40", "100", "200", "400", "all"])
        check_choice("task", self.task, ["binary", "subtype"])
        check_choice("group-by", self.group_by, ["group", "patient"])


# The original project's head: Dense 512 / Dropout 0.5, Dense 256 / Dropout 0.3 (the one copy of
# these numbers: the model, the config and the checkpoint contract take them from here).
MLP_HEAD_DIMS: tuple[int, ...] = (512, 256)
MLP_HEAD_DROPOUTS: tuple[float, ...] = (0.5, 0.3)


@dataclass
class ModelConfig:
    """Backbone by name, its input size, and the head: a linear probe or the original MLP."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "imagenet"
    unfreeze: int = 0
    # "linear": logistic regression on frozen features, C by inner patient-level CV (default);
    # "mlp": the original project's head trained by Lightning (head_dims/dropouts below).
    head: str = "linear"
    head_dims: tuple[int, ...] = MLP_HEAD_DIMS
    dropouts: tuple[float, ...] = MLP_HEAD_DROPOUTS
    # (height, width) fed to the backbone; None: the backbone's pretrained input size. The
    # whole field of view is resized to it (a convolutional backbone takes any size).
    input_size: tuple[int, int] | None = (294, 448)
    # Where the head reads the backbone: "auto" (the linear probe: the backbone's registered
    # probe layers, blocks.2 + blocks.5 for EfficientNet-Lite0; the MLP: the last layer),
    # "last", or "blocks.N[,blocks.M...]" (pooled outputs concatenated).
    feature_layer: str = "auto"

    def __post_init__(self) -> None:
        check_choice("head", self.head, ["linear", "mlp"])
        self.head_dims = tuple(int(d) for d in self.head_dims)
        self.dropouts = tuple(float(d) for d in self.dropouts)
        if len(self.head_dims) != len(self.dropouts):
            raise ConfigError("head_dims and dropouts need the same length.")
        if self.unfreeze < 0:
            raise ConfigError(f"--unfreeze must be 0 or more, got {self.unfreeze}.")
        if self.head == "linear" and self.unfreeze:
            raise ConfigError("--unfreeze trains backbone stages, which needs --head mlp.")
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 2 or min(size) < 32 or max(size) > 4096:
                raise ConfigError(
                    f"input_size must be (height, width) between 32 and 4096, got {self.input_size}."
                )
            self.input_size = size


@dataclass
class AugmentConfig:
    """Keras ImageDataGenerator-style geometric augmentation, plus stain augmentation."""

    enabled: bool = True
    rotation: float = 20.0  # degrees, uniform in [-r, r]
    shift: float = 0.2  # fraction of width/height
    # Keras reads shear_range in degrees, so the original project's 0.2 is a 0.2-degree shear.
    shear: float = 0.2
    zoom: float = 0.2  # scale in [1 - z, 1 + z], per axis as in Keras
    hflip: bool = True
    vflip: bool = True
    fill: str = "nearest"  # "nearest" (replicate edges, Keras's default) or "reflect"/"constant"
    stain: bool = False  # HED-space colour jitter
    stain_sigma: float = 0.05
    stain_bias: float = 0.02  # in HED optical-density units; tissue is ~0.05

    def __post_init__(self) -> None:
        check_choice("fill mode", self.fill, ["nearest", "reflect", "constant"])


@dataclass
class StainConfig:
    """Stain normalisation: method and an optional reference image (else chosen from training)."""

    method: str = "macenko"
    # An image file, a JSON file of a fitted normaliser (a run's checkpoint "stain" state), or
    # None: the median stain of up to 200 training images.
    reference: str | None = None

    def __post_init__(self) -> None:
        check_choice(
            "stain normalisation", self.method, ["none", "macenko", "macenko-h", "reinhard"]
        )


# What may compute a frozen backbone's features (see histolens.models.engine).
ENGINES = ("auto", "torch", "openvino", "onnxruntime")


@dataclass
class TrainConfig:
    """The optimisation recipe."""

    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 50
    class_weights: bool = True
    early_stopping_patience: int = 10
    lr_patience: int = 5
    lr_factor: float = 0.2
    min_lr: float = 1e-6
    backbone_lr_factor: float = 0.1  # unfrozen backbone layers train at lr * this
    feature_cache: bool = True  # frozen backbone: compute features once, train the head on them
    cache_views: int = 4  # augmented views per training image in the cache
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"  # processes per machine ("auto": one, or as torchrun started)
    strategy: str = "auto"  # Lightning's: auto, ddp, ...
    num_nodes: int = 1
    precision: str = "32-true"
    # What computes the frozen backbone's features (histolens.models.engine): auto (the fastest
    # runtime here: OpenVINO, ONNX Runtime, else PyTorch), torch, openvino or onnxruntime; None:
    # $HISTOLENS_ENGINE, else auto. A run's saved config holds the engine that computed them.
    engine: str | None = None
    threshold_method: str = "youden"  # or "sensitivity"
    target_sensitivity: float = 0.95
    # Where the decision sits, chosen per magnification on held-out predictions
    # (histolens.stats.decisions): youden, sensitivity:T or specificity:T; None: as
    # threshold_method says (youden by default).
    operating_point: str | None = None
    # How magnifications with enough patients get their thresholds: "shared" (one choice with
    # each magnification's logit offset taken out) or "separate" (each on its own images).
    magnification_thresholds: str = "shared"
    seed: int = 42
    # The estimate on unseen patients: patient-level k-fold cross-validation (out-of-fold
    # predictions of every patient), then the shipped model is fitted on all patients.
    # 0: a single held-out split (data.val_fraction / data.test_fraction) instead.
    cv_folds: int = 5
    # Linear probe: inverse regularisation strength, or several tried by inner patient-level CV.
    # One strong value is the default: on breakhis-dev the inner-CV choice swung between 1e-3
    # and 1e-1 from fold to fold and generalised worse (README, "Why these defaults").
    probe_cs: tuple[float, ...] = (3e-3,)
    # Linear probe: how its loss weighs the training images: "image" (each image of a class the
    # same) or "patient" (each patient group of a class the same; histolens.training.probe).
    probe_weighting: str = "image"
    # Linear probe: each training image's features are the mean of its clean view and this many
    # augmented views (``augment``: geometric and/or stain jitter); 0 = the clean view only.
    # Predictions always use the clean view. Measured in the README; not the default.
    probe_views: int = 0
    # Error level of the conformal prediction sets (histolens.stats.conformal): a new patient's image
    # has its true class in its set with probability at least 1 - alpha; changeable at predict.
    alpha: float = 0.1
    # The MLP head's training loss (histolens.training.mixing); validation loss stays on the hard labels.
    label_smoothing: float = 0.0  # targets move this share of the way towards uniform
    mixup: float = 0.0  # Beta(a, a) concentration of MixUp's share (cached features or images)
    cutmix: float = 0.0  # the same for CutMix: images only (--unfreeze N or --no-feature-cache)

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, ["sgd", "adam", "adamw"])
        check_choice("threshold method", self.threshold_method, ["youden", "sensitivity", "fixed"])
        if self.engine is not None:
            check_choice("engine", self.engine, ENGINES)
        from histolens.stats.operating_points import check_magnification_thresholds

        check_magnification_thresholds(self.magnification_thresholds)
        if self.operating_point is not None:
            from histolens.stats.operating_points import parse_operating_point

            self.operating_point = str(parse_operating_point(self.operating_point))
        for name in ("lr", "batch_size", "epochs", "cache_views", "num_nodes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError("target_sensitivity must be in (0, 1].")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ConfigError(
                f"--cv-folds must be 0 (held-out split) or 2 or more, got {self.cv_folds}."
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must be between 0 and 1, got {self.alpha}.")
        if self.probe_views < 0:
            raise ConfigError(f"probe_views must be 0 or more, got {self.probe_views}.")
        self.probe_cs = tuple(float(c) for c in self.probe_cs)
        check_choice("probe weighting", self.probe_weighting, ["image", "patient"])
        if not self.probe_cs or min(self.probe_cs) <= 0:
            raise ConfigError("probe_cs must be one or more positive numbers.")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"--label-smoothing must be 0 or more and below 1, got {self.label_smoothing}."
            )
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ConfigError(
                    f"--{name} must be 0 (off) or a positive Beta concentration, "
                    f"got {getattr(self, name)}."
                )


@dataclass
class RunConfig:
    """Everything a run needs; saved as JSON next to its checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "default"

    def __post_init__(self) -> None:
        t = self.train
        if self.model.head == "linear":
            for name in ("label_smoothing", "mixup", "cutmix"):
                if getattr(t, name) > 0:
                    flag = name.replace("_", "-")
                    raise ConfigError(
                        f"--{flag} trains the MLP head; add --head mlp or leave --{flag} at 0."
                    )
        if t.cutmix > 0 and t.feature_cache and self.model.unfreeze == 0:
            raise ConfigError(
                "--cutmix pastes boxes between images, but a frozen backbone trains on cached "
                "features; add --unfreeze N or --no-feature-cache (or use --mixup instead)."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        cfg = cls(recipe=d.pop("recipe", "default"))
        if "head" not in d.get("model", {"head": None}):
            # Saved before the linear probe existed: those runs were the MLP head at the
            # backbone's own input size, on one held-out split, without stain normalisation
            # unless the config says so.
            cfg = cfg.override(
                {
                    "model.head": "mlp",
                    "model.input_size": None,
                    "model.feature_layer": "last",
                    "train.cv_folds": 0,
                    "stain.method": "none",
                }
            )
        if "train" in d and "magnification_thresholds" not in d["train"]:
            # Saved before the shared choice existed: those runs chose each magnification's
            # threshold on its own images (a resumed run keeps doing so).
            cfg = cfg.override({"train.magnification_thresholds": "separate"})
        # All sections at once: a setting may be valid only with another section's (--mixup
        # with model.head "mlp").
        return cfg.override(d)

    def override(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with ``{"section": {"key": value}}`` or ``{"section.key": value}`` applied."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        nested: dict[str, dict[str, Any]] = {}
        recipe = self.recipe
        for key, value in overrides.items():
            if key == "recipe":
                recipe = value
                continue
            if "." in key:
                sec, sub = key.split(".", 1)
                nested.setdefault(sec, {})[sub] = value
            elif isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                raise ConfigError(f"Config key '{key}' needs a section, e.g. 'train.{key}'.")
        new_sections = {}
        for sec, obj in sections.items():
            if sec == "recipe":
                continue
            changes = nested.pop(sec, {})
            valid = {f.name for f in dataclasses.fields(obj)}
            for name in changes:
                if name not in valid:
                    raise ConfigError(
                        f"Unknown setting '{sec}.{name}'; valid: {', '.join(sorted(valid))}."
                        + did_you_mean(name, valid)
                    )
            new_sections[sec] = dataclasses.replace(obj, **changes) if changes else obj
        if nested:
            bad = next(iter(nested))
            raise ConfigError(
                f"Unknown config section '{bad}'; valid: data, model, augment, stain, train."
                + did_you_mean(bad, ["data", "model", "augment", "stain", "train"])
            )
        return RunConfig(**new_sections, recipe=recipe)


# The original project's recipe, exactly; and histolens's defaults, chosen by patient-level
# cross-validation on real BreakHis images (see README, "Why these defaults").
RECIPES: dict[str, dict[str, Any]] = {
    "original": {
        "recipe": "original",
        "model.backbone": "vgg16",
        "model.head": "mlp",
        "model.input_size": None,
        "model.feature_layer": "last",
        "train.cv_folds": 0,
        "train.optimizer": "sgd",
        "train.lr": 1e-4,
        "train.momentum": 0.9,
        "train.batch_size": 32,
        "train.epochs": 50,
        "train.class_weights": True,
        "train.early_stopping_patience": 10,
        "train.lr_patience": 5,
        "train.lr_factor": 0.2,
        "train.feature_cache": False,
        "augment.enabled": True,
        "augment.stain": False,
        "stain.method": "none",
    },
    "default": {"recipe": "default"},
}


def recipe_config(name: str) -> RunConfig:
    """The RunConfig of a named recipe ('default' or 'original')."""
    check_choice("recipe", name, list(RECIPES))
    return RunConfig().override(RECIPES[name])


def load_yaml_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) file of ``section: {key: value}`` overrides."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read config file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of sections.")
    return data
