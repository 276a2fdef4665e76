"""The backbone registry: everything that differs between backbones lives in one entry.

A backbone is made by timm name; its entry knows the Grad-CAM target layer, how to reshape token
outputs for CAM (ViT), how to group layers for ``--unfreeze N``, and where ImageNet weights come
from. Any other timm name works too, with defaults read from the model's ``feature_info``, and so
does any timm model on the Hugging Face hub (``hf-hub:ORG/NAME``). The pathology foundation models
(UNI, UNI2-h, Virchow2, H-optimus-0, Midnight) have entries of their own: the creation arguments
their model cards give, their preprocessing, pooled feature, licence and whether they are gated.

Entries and their spec live in ``_backbone_registry``, making a backbone with its weights in
``_weights``, hub access in ``_hub_backbones``; their public names are importable here.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histolens.errors import ConfigError, did_you_mean
from histolens.models import weights as _weights
from histolens.models.hub import hub_file
from histolens.models.registry import BACKBONES, BackboneSpec, vit_reshape_transform
from histolens.models.weights import *  # noqa: F403  (re-exported: see ``__all__``)

__all__ = [
    *_weights.__all__,
    "BACKBONES",
    "BackboneSpec",
    "get_backbone_spec",
    "hub_id_of",
    "resolve_module",
    "vit_reshape_transform",
]


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
