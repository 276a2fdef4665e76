"""The classifier: a timm backbone and the original project's head, width taken from the backbone."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from histolens.config import MLP_HEAD_DIMS, MLP_HEAD_DROPOUTS
from histolens.errors import ConfigError
from histolens.models.backbones import BackboneSpec, create_backbone

__all__ = [
    "ClassifierHead",
    "HistoClassifier",
    "build_model",
    "n_outputs",
    "resolve_feature_layer",
    "tile_starts",
]


def tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` pixels, evenly overlapped.

    A margin under 15% of a tile is cropped rather than given a tile of its own.
    """
    if length <= tile:
        return [0]
    n = max(1, math.ceil(length / tile - 0.15))
    if n == 1:
        return [(length - tile) // 2]
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def n_outputs(n_classes: int) -> int:
    """One logit for two classes (sigmoid, as the original project), else one per class."""
    return 1 if n_classes == 2 else n_classes


class ClassifierHead(nn.Module):
    """Dense 512 + ReLU, BatchNorm, Dropout 0.5, Dense 256 + ReLU, BatchNorm, Dropout 0.3, logits."""

    def __init__(
        self,
        in_features: int,
        n_out: int,
        dims: Sequence[int] = MLP_HEAD_DIMS,
        dropouts: Sequence[float] = MLP_HEAD_DROPOUTS,
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
        head_dims: Sequence[int] = MLP_HEAD_DIMS,
        dropouts: Sequence[float] = MLP_HEAD_DROPOUTS,
        feature_layer: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.n_classes = n_classes
        self.feature_layer = feature_layer or None
        # Indices of the blocks whose pooled outputs are concatenated (None: the last layer).
        self._levels: list[int] | None = (
            _cut_after(backbone, feature_layer) if feature_layer else None
        )
        self.feature_dim = self._feature_dim()
        self.head = ClassifierHead(self.feature_dim, n_outputs(n_classes), head_dims, dropouts)
        # Inputs larger than the backbone's pretrained size are cut into tiles of that size
        # (ImageNet features are made at that scale); an image's features are the tiles' mean.
        size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        self.tile_size: tuple[int, int] | None = (
            None if spec.pooling == "token" else (int(size[1]), int(size[2]))
        )
        self._grid: tuple[int, list[int], list[int], tuple[int, int]] | None = None

    def _feature_dim(self) -> int:
        if self._levels:
            width = 0
            for i in self._levels:
                stage = self.backbone.blocks[i]
                last = stage[-1] if isinstance(stage, nn.Sequential) else stage
                width += [m for m in last.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            return int(width)
        if self.spec.pooling == "token":
            return int(self.backbone.num_features) * (2 if self.spec.pooled == "cls+mean" else 1)
        info = getattr(self.backbone, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, list) else info.info[-1]
            # EfficientNets report the last block; the conv head widens it to num_features.
            if self.spec.timm_name.startswith(("vgg", "resnet", "densenet")):
                return int(last["num_chs"])
        return int(self.backbone.num_features)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.spec.pooled == "cls+mean":  # Virchow2, Midnight: CLS and mean patch token
            patches = feature_map[:, self.spec.num_prefix_tokens :]
            return torch.cat([feature_map[:, 0], patches.mean(dim=1)], dim=1)
        if self.spec.pooling == "token":
            return self.backbone.forward_head(feature_map, pre_logits=True)
        return feature_map.mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim): what the feature cache stores."""
        tiles = self._tiles(x)
        if tiles is None:
            return self._pooled(x)
        pooled = self._pooled(tiles)
        return pooled.view(x.shape[0], -1, pooled.shape[-1]).mean(1)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if not self._levels:
            return self.pool(self.backbone.forward_features(x))
        bb = self.backbone
        h = bb.bn1(bb.conv_stem(x))
        pooled = []
        for i, stage in enumerate(bb.blocks):
            h = stage(h)
            if i in self._levels:
                pooled.append(h.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    @property
    def cam_target_layer(self) -> str:
        """The layer(s) a CAM explains, comma-separated: with several feature levels, every
        level (the Explainer stops each level's gradient at that level, so each map shows that
        level's own pooled contribution, and the CAM averages them); else the registry's
        target layer. On the synthetic lesion set the two levels of the default model point
        into the lesion on 24 of 24 images, against 21 at either level alone."""
        if self._levels and len(self._levels) > 1:
            return ",".join(f"blocks.{i}" for i in self._levels)
        return self.spec.target_layer

    def _tiles(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B * T, 3, th, tw) tiles of an input larger than the tile size, image-major; else None."""
        self._grid = None
        if self.tile_size is None:
            return None
        h, w = x.shape[-2:]
        th, tw = min(self.tile_size[0], h), min(self.tile_size[1], w)
        ys, xs = tile_starts(h, th), tile_starts(w, tw)
        if len(ys) * len(xs) == 1 and (th, tw) == (h, w):
            return None
        self._grid = (x.shape[0], ys, xs, (th, tw))
        crops = [x[:, :, y : y + th, x0 : x0 + tw] for y in ys for x0 in xs]
        tiles = torch.stack(crops, dim=1).flatten(0, 1)
        return (
            tiles.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else tiles
        )

    def stitch_tiles(self, maps: torch.Tensor) -> torch.Tensor:
        """Per-tile feature maps (B * T, C, h, w) of the last forward -> one map (B, C, H, W).

        Each tile's map is placed where the tile lies in the image (overlaps averaged): the
        reshape transform that lets a CAM explain a tiled image as a whole.
        """
        if self._grid is None or maps.dim() != 4:
            return maps
        batch, ys, xs, (th, tw) = self._grid
        if maps.shape[0] != batch * len(ys) * len(xs):
            return maps
        fh, fw = maps.shape[-2:]
        sy, sx = th / fh, tw / fw  # pixels per feature cell
        rows = [round(y / sy) for y in ys]
        cols = [round(x / sx) for x in xs]
        out = maps.new_zeros(batch, maps.shape[1], rows[-1] + fh, cols[-1] + fw)
        count = maps.new_zeros(1, 1, rows[-1] + fh, cols[-1] + fw)
        per_image = maps.view(batch, len(ys) * len(xs), *maps.shape[1:])
        for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
            out[:, :, r : r + fh, c : c + fw] += per_image[:, i]
            count[:, :, r : r + fh, c : c + fw] += 1
        return out / count.clamp_min(1)

    def cam_reshape_transform(self, activations: torch.Tensor) -> torch.Tensor:
        """What a CAM applies to the target layer's output: token grid (ViT) or stitched tiles."""
        transform = self.spec.reshape_transform
        if transform is not None:
            return transform(activations)
        return self.stitch_tiles(activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features they came from, in one pass (the OOD guard reads both)."""
        features = self.features(x)
        return self.head(features), features

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


def _cut_after(backbone: nn.Module, layers: str) -> list[int]:
    """Cut an EfficientNet/MobileNet-style timm backbone after the deepest of ``layers``.

    ``layers`` is 'blocks.N' or a comma-separated list of them, whose pooled outputs the head
    then reads (concatenated). The later blocks go, and the conv head and its norm become
    identities (the CAM target ``bn2`` then sees the cut block's output). Returns the indices.
    """
    blocks = getattr(backbone, "blocks", None)
    names = [name.strip() for name in layers.split(",") if name.strip()]
    matches = [re.fullmatch(r"blocks\.(\d+)", name) for name in names]
    if (
        not names
        or not all(matches)
        or not isinstance(blocks, nn.Sequential)
        or not hasattr(backbone, "conv_head")
    ):
        raise ConfigError(
            f"Feature layer '{layers}' is not supported for this backbone: use 'blocks.N' (or a "
            "comma-separated list) with an EfficientNet/MobileNet-style backbone, or 'last'."
        )
    levels = sorted({int(m.group(1)) for m in matches})
    if levels[-1] >= len(blocks):
        raise ConfigError(f"Feature layer '{layers}': the backbone has {len(blocks)} blocks.")
    backbone.blocks = blocks[: levels[-1] + 1]
    backbone.conv_head = nn.Identity()
    backbone.bn2 = nn.Identity()
    return levels


def resolve_feature_layer(spec: BackboneSpec, setting: str | None, head: str) -> str | None:
    """'auto' -> the registry's probe layer (linear head) or the last layer (MLP head);
    'last' or None -> no cut; else the given 'blocks.N'."""
    if setting in (None, "", "last"):
        return None
    if setting == "auto":
        return spec.probe_layer if head == "linear" else None
    return setting


def build_model(
    spec: BackboneSpec,
    n_classes: int,
    pretrained: str = "imagenet",
    head_dims: Sequence[int] = MLP_HEAD_DIMS,
    dropouts: Sequence[float] = MLP_HEAD_DROPOUTS,
    feature_layer: str | None = None,
) -> HistoClassifier:
    """Make the classifier; the backbone's weights come from ``pretrained`` (see create_backbone).

    ``feature_layer`` ('blocks.N') cuts the backbone after that block: its pooled output is
    what the head sees.
    """
    backbone = create_backbone(spec, pretrained)
    return HistoClassifier(spec, backbone, n_classes, head_dims, dropouts, feature_layer)
