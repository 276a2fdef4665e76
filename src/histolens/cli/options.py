"""Click options shared by the ``histolens`` commands, defined once (as TIAToolbox's cli/common).

Each function returns a decorator; the arguments cover what really differs between commands (a
default, a help line), so the same flag has the same name, type and choices everywhere. Only
click is imported here: ``histolens --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = [
    "GROUP_BY_CHOICES",
    "MAGNIFICATIONS",
    "MAGNIFICATION_CHOICES",
    "ONNX_RUNTIME_CHOICES",
    "RECIPE_CHOICES",
    "STAIN_NORM_CHOICES",
    "TASK_CHOICES",
    "alpha_option",
    "backbone_option",
    "checkpoint_argument",
    "checkpoint_option",
    "combine",
    "config_option",
    "count_option",
    "data_option",
    "device_option",
    "engine_option",
    "epochs_option",
    "float_option",
    "lr_option",
    "magnification_option",
    "microns_option",
    "onnx_runtime_option",
    "out_option",
    "patient_from_option",
    "path_option",
    "pretrained_option",
    "quiet_option",
    "recipe_option",
    "seed_option",
    "split_name_option",
    "split_options",
    "stain_augment_option",
    "stain_norm_option",
    "task_option",
]

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

MAGNIFICATIONS = ("40", "100", "200", "400")
MAGNIFICATION_CHOICES = (*MAGNIFICATIONS, "all")
TASK_CHOICES = ("binary", "subtype")
STAIN_NORM_CHOICES = ("none", "macenko", "macenko-h", "reinhard")
RECIPE_CHOICES = ("default", "original")
GROUP_BY_CHOICES = ("group", "patient")
# histolens.inference.runtimes.ONNX_RUNTIMES, repeated so that --help does not import torch.
ONNX_RUNTIME_CHOICES = ("onnxruntime", "openvino")
# histolens.config.ENGINES, repeated for the same reason.
ENGINE_CHOICES = ("auto", "torch", "openvino", "onnxruntime")

_EXISTING = click.Path(exists=True, path_type=Path)


def combine(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` so that --help lists them in the order given."""

    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# --- models and data ---------------------------------------------------------------------------
def checkpoint_argument() -> Decorator:
    """CHECKPOINT: a checkpoint file or a run directory (its best checkpoint)."""
    return click.argument("checkpoint", type=_EXISTING)


def checkpoint_option(
    required: bool = False, help: str = "Checkpoint file or run directory."
) -> Decorator:
    """``--checkpoint/-c``, for commands whose arguments are something else."""
    return click.option("--checkpoint", "-c", required=required, type=_EXISTING, help=help)


def data_option(
    required: bool = False, help: str = "Image folder (any supported layout) or CSV manifest."
) -> Decorator:
    """``--data PATH`` (parameter ``data_path``)."""
    return click.option("--data", "data_path", required=required, type=_EXISTING, help=help)


def out_option(
    help: str, default: Path | None = None, file_okay: bool = True, dir_okay: bool = True
) -> Decorator:
    """``--out PATH``: where a command writes; ``help`` says what and the default."""
    return click.option(
        "--out",
        type=click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=Path),
        default=default,
        show_default=default is not None,
        help=help,
    )


def count_option(
    flag: str, default: int | None, help: str | None = None, minimum: int = 1
) -> Decorator:
    """``flag``: a whole number of at least ``minimum`` (images, workers, folds), its default
    shown; a default of None: no limit unless given."""
    return click.option(
        flag,
        default=default,
        show_default=default is not None,
        type=click.IntRange(minimum),
        help=help,
    )


def float_option(
    flag: str, default: float, help: str, minimum: float = 0, maximum: float | None = None
) -> Decorator:
    """``flag``: a number from ``minimum`` to ``maximum`` (megabytes, an opacity), default shown."""
    return click.option(
        flag, default=default, show_default=True, type=click.FloatRange(minimum, maximum), help=help
    )


def path_option(*decls: str, help: str, **checks: bool) -> Decorator:
    """An optional path flag, None unless given; ``checks`` are click.Path's (``exists``,
    ``file_okay``, ``dir_okay``)."""
    return click.option(*decls, type=click.Path(path_type=Path, **checks), default=None, help=help)


def microns_option(flag: str, help: str) -> Decorator:
    """``flag``: microns per pixel, a positive number; None unless given (the file or the
    checkpoint decides then)."""
    return click.option(flag, type=click.FloatRange(min=0, min_open=True), default=None, help=help)


def _choice_option(flag: str, choices: Sequence[str], help: str) -> Decorator:
    """``flag``: one of ``choices`` (any case); None unless given, so that an environment
    variable or the checkpoint decides then."""
    return click.option(
        flag, type=click.Choice(choices, case_sensitive=False), default=None, help=help
    )


def device_option() -> Decorator:
    """``--device``: the torch device a model runs on."""
    return click.option(
        "--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1."
    )


def onnx_runtime_option() -> Decorator:
    """``--onnx-runtime``: what runs an ONNX export; None unless given, so that the environment
    variable HISTOLENS_ONNX_RUNTIME decides then, and a torch checkpoint refuses it only if given."""
    return _choice_option(
        "--onnx-runtime",
        ONNX_RUNTIME_CHOICES,
        help="Which runtime runs an .onnx export (default: ONNX Runtime, or "
        "$HISTOLENS_ONNX_RUNTIME); openvino needs 'pip install openvino'.",
    )


def engine_option() -> Decorator:
    """``--engine``: what computes the frozen backbone's features (histolens.models.engine); None unless
    given, so that $HISTOLENS_ENGINE decides then (else auto)."""
    return _choice_option(
        "--engine",
        ENGINE_CHOICES,
        help="What computes the frozen backbone's features: auto (default, or $HISTOLENS_ENGINE: "
        "the fastest runtime here, checked against PyTorch) or torch; see docs/engine.md.",
    )


def patient_from_option() -> Decorator:
    """``--patient-from REGEX``: each image's patient id from its path (for patients.csv)."""
    return click.option(
        "--patient-from",
        metavar="REGEX",
        help="Patient id of each image from its path: the group named 'patient', else the "
        "first group, else the match (default: BreakHis file names, a manifest's patient "
        "column). Writes patients.csv: one decision per patient.",
    )


def quiet_option(help: str = "No progress bars.") -> Decorator:
    """``--quiet``: no progress bars."""
    return click.option("--quiet", is_flag=True, help=help)


def alpha_option(
    help: str = "Error level of the prediction sets (default: the one chosen at training).",
) -> Decorator:
    """``--alpha``: the error level of the conformal prediction sets, in (0, 1)."""
    return click.option(
        "--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=help
    )


# The ways of choosing thresholds per magnification (histolens.stats.operating_points
# .MAGNIFICATION_THRESHOLDS, spelled out to keep this module's imports light).
MAGNIFICATION_THRESHOLD_WAYS = ("shared", "separate")


def magnification_thresholds_option(default: str) -> Decorator:
    """``--magnification-thresholds shared|separate``; ``default`` says, in words, what holds
    without it."""
    return click.option(
        "--magnification-thresholds",
        type=click.Choice(MAGNIFICATION_THRESHOLD_WAYS),
        help="shared: one choice over the magnifications with enough patients, on probabilities "
        "with each magnification's offset taken out, moved back by it; separate: each on its "
        f"own images (default: {default}).",
    )


def seed_option(default: int | None = None, help: str | None = None) -> Decorator:
    """``--seed``; None as the default means "the config's seed"."""
    return click.option(
        "--seed", default=default, show_default=default is not None, type=int, help=help
    )


def split_name_option(
    choices: Sequence[str], default: str | None, help: str | None = None
) -> Decorator:
    """``--split NAME`` (parameter ``split_name``): a side of a run's patient-level split."""
    return click.option(
        "--split",
        "split_name",
        type=click.Choice(list(choices)),
        default=default,
        show_default=default is not None,
        help=help,
    )


# --- data selection and the patient-level split --------------------------------------------------
def magnification_option(
    default: str | None = None,
    help: str | None = None,
    choices: Sequence[str] = MAGNIFICATION_CHOICES,
) -> Decorator:
    """``--magnification/-m``: 40, 100, 200, 400 or all (any case); ``choices`` narrows them
    (``MAGNIFICATIONS``: one magnification, no "all")."""
    return click.option(
        "--magnification",
        "-m",
        default=default,
        show_default=default is not None,
        type=click.Choice(list(choices), case_sensitive=False),
        help=help,
    )


def task_option(default: str | None = None) -> Decorator:
    """``--task``: binary (benign / malignant) or subtype (the eight BreakHis subtypes)."""
    return click.option(
        "--task",
        default=default,
        show_default=default is not None,
        type=click.Choice(TASK_CHOICES),
        help="binary: benign vs malignant; subtype: the BreakHis tumour subtypes.",
    )


def split_options(defaults: bool = True) -> Decorator:
    """``--magnification``, ``--task``, ``--val-fraction``, ``--test-fraction``, ``--seed`` and
    ``--group-by``: the data and split a run uses.

    Args:
        defaults: show the config's defaults (``data summary``); False leaves every option
            None unless given, so that it overrides a config only then (``train``).
    """

    def value(v: Any) -> Any:
        return v if defaults else None

    return combine(
        magnification_option(value("all")),
        task_option(value("binary")),
        click.option(
            "--val-fraction",
            default=value(0.15),
            show_default=defaults,
            type=float,
            help="Share of patients in the validation split.",
        ),
        click.option(
            "--test-fraction",
            default=value(0.15),
            show_default=defaults,
            type=float,
            help="Share of patients in the test split.",
        ),
        seed_option(value(42), help="Seed of the patient-level split."),
        click.option(
            "--group-by",
            default=value("group"),
            show_default=defaults,
            type=click.Choice(GROUP_BY_CHOICES),
            help="Keep patient groups (numeric id core) or exact patient ids together.",
        ),
    )


# --- training recipes ----------------------------------------------------------------------------
def recipe_option() -> Decorator:
    """``--recipe``: the default recipe or the original student project's, exactly."""
    return click.option(
        "--recipe",
        type=click.Choice(RECIPE_CHOICES),
        default="default",
        show_default=True,
        help="'original' is the student project's recipe exactly.",
    )


def config_option() -> Decorator:
    """``--config FILE`` (parameter ``config_file``): YAML overrides of the run config."""
    return click.option(
        "--config",
        "config_file",
        type=_EXISTING,
        help="YAML file of overrides (sections data/model/augment/stain/train).",
    )


def stain_norm_option() -> Decorator:
    """``--stain-norm``: none, macenko, macenko-h (haematoxylin only) or reinhard."""
    return click.option(
        "--stain-norm",
        type=click.Choice(STAIN_NORM_CHOICES),
        help="Stain normalisation of every image; macenko-h: Macenko, haematoxylin only "
        "(default: the recipe's).",
    )


def stain_augment_option() -> Decorator:
    """``--stain-augment/--no-stain-augment``: HED colour jitter while training."""
    return click.option(
        "--stain-augment/--no-stain-augment",
        default=None,
        help="HED-space colour jitter of training images.",
    )


def backbone_option() -> Decorator:
    """``--backbone``: a registered backbone or any timm model name."""
    return click.option(
        "--backbone",
        help="tf_efficientnet_lite0 (default), vgg16, resnet50, densenet121, efficientnet_b0, "
        "vit_small_patch16_224, uni, uni2-h, virchow2, h-optimus-0, midnight, any timm name, or "
        "hf-hub:ORG/NAME (a timm model on the Hugging Face hub).",
    )


def pretrained_option() -> Decorator:
    """``--pretrained``: where the backbone's starting weights come from."""
    return click.option("--pretrained", help="imagenet (default), none, or a weights file.")


def epochs_option() -> Decorator:
    """``--epochs``: training epochs of the MLP head (and unfrozen stages)."""
    return click.option("--epochs", type=click.IntRange(1), help="Training epochs.")


def lr_option() -> Decorator:
    """``--lr``: the learning rate."""
    return click.option("--lr", type=float, help="Learning rate.")
