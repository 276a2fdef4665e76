"""Pictures of heatmaps: jet overlays and the labelled panel the report gallery shows."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["heatmap_to_size", "jet", "overlay_heatmap", "render_panel"]


def jet(heatmap: np.ndarray) -> np.ndarray:
    """Heatmap in [0, 1] (H, W) -> uint8 RGB (H, W, 3) with the jet colormap."""
    import cv2

    values = np.uint8(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255)
    return cv2.cvtColor(cv2.applyColorMap(values, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def heatmap_to_size(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) map to PIL ``size`` (W, H), kept in [0, 1] as float32."""
    import cv2

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != (size[1], size[0]):
        heatmap = cv2.resize(heatmap, size, interpolation=cv2.INTER_LINEAR)
    return np.clip(heatmap, 0.0, 1.0).astype(np.float32)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the jet-coloured ``heatmap`` over ``image``; ``alpha`` is the heatmap's opacity."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = jet(heatmap_to_size(heatmap, image.size)).astype(np.float32)
    blended = (1.0 - alpha) * rgb + alpha * colour
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_panel(
    image: Image.Image, heatmap: np.ndarray, lines: list[str], alpha: float = 0.5, height: int = 300
) -> Image.Image:
    """Image and overlay side by side (scaled to ``height``) above a caption of ``lines``."""
    scale = height / image.height
    width = max(1, round(image.width * scale))
    left = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    right = overlay_heatmap(image, heatmap, alpha).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    font = ImageFont.load_default()
    line_h = 14
    caption_h = 8 + line_h * len(lines)
    panel = Image.new("RGB", (2 * width + 6, height + caption_h), (255, 255, 255))
    panel.paste(left, (0, 0))
    panel.paste(right, (width + 6, 0))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((4, height + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    return panel
