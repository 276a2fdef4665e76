"""The classifier: a timm backbone and the original project's head, width taken from the backbone."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from histolens.backbones import BackboneSpec, create_backbone
from histolens.errors import ConfigError

__all__ = ["ClassifierHead", "HistoClassifier", "build_model", "n_outputs"]


def n_outputs(n_classes: int) -> int:
    """One logit for two classes (sigmoid, as the original project), else one per class."""
    return 1 if n_classes == 2 else n_classes


class ClassifierHead(nn.Module):
    """Dense 512 + ReLU, BatchNorm, Dropout 0.5, Dense 256 + ReLU, BatchNorm, Dropout 0.3, logits."""

    def __init__(
        self,
        in_features: int,
        n_out: int,
        dims: Sequence[int] = (512, 256),
        dropouts: Sequence[float] = (0.5, 0.3),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for dim, p in zip(dims, dropouts, strict=True):
            layers += [
                nn.Linear(width, dim),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(dim),
                nn.Dropout(p),
            ]
            width = dim
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, n_out)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))


class HistoClassifier(nn.Module):
    """Backbone -> pooled features -> head. ``forward`` returns logits (B, n_out)."""

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module,
        n_classes: int,
        head_dims: Sequence[int] = (512, 256),
        dropouts: Sequence[float] = (0.5, 0.3),
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.n_classes = n_classes
        self.feature_dim = self._feature_dim()
        self.head = ClassifierHead(self.feature_dim, n_outputs(n_classes), head_dims, dropouts)

    def _feature_dim(self) -> int:
        if self.spec.pooling == "token":
            return int(self.backbone.num_features)
        info = getattr(self.backbone, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, list) else info.info[-1]
            # EfficientNets report the last block; the conv head widens it to num_features.
            if self.spec.timm_name.startswith(("vgg", "resnet", "densenet")):
                return int(last["num_chs"])
        return int(self.backbone.num_features)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "token":
            return self.backbone.forward_head(feature_map, pre_logits=True)
        return feature_map.mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim): what the feature cache stores."""
        return self.pool(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def backbone_stages(self) -> list[list[nn.Parameter]]:
        """Backbone parameters grouped shallow to deep, for ``--unfreeze N``."""
        named = list(self.backbone.named_parameters())
        if self.spec.stages:
            groups = [[p for n, p in named if re.match(rx, n)] for rx in self.spec.stages]
            tail = [
                p
                for n, p in named
                if not any(re.match(rx, n) for rx in self.spec.stages)
                and not n.startswith("features.")
            ]
            groups[-1].extend(tail)
            return [g for g in groups if g]
        from timm.models import group_parameters

        by_name = dict(named)
        grouped = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [
            [by_name[n] for n in names if n in by_name]
            for names in grouped.values()
            if any(n in by_name for n in names)
        ]

    def set_trainable(self, unfreeze: int) -> list[nn.Parameter]:
        """Freeze the backbone except its last ``unfreeze`` stages; return those parameters."""
        stages = self.backbone_stages()
        if unfreeze > len(stages):
            raise ConfigError(
                f"--unfreeze {unfreeze} exceeds the {len(stages)} stages of {self.spec.name}."
            )
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        trainable = (
            [p for stage in stages[len(stages) - unfreeze :] for p in stage] if unfreeze else []
        )
        for p in trainable:
            p.requires_grad_(True)
        return trainable


def build_model(
    spec: BackboneSpec,
    n_classes: int,
    pretrained: str = "imagenet",
    head_dims: Sequence[int] = (512, 256),
    dropouts: Sequence[float] = (0.5, 0.3),
) -> HistoClassifier:
    """Make the classifier; the backbone's weights come from ``pretrained`` (see create_backbone)."""
    backbone = create_backbone(spec, pretrained)
    return HistoClassifier(spec, backbone, n_classes, head_dims, dropouts)
