"""Pictures for MLflow: image tiles laid out in a grid, enlarged to be readable, with row and column labels.

28–32 px tiles are a few millimetres on screen in the MLflow UI; each tile is enlarged by a whole
factor with nearest-neighbour (pixels stay pixels, nothing is invented) to at least ``min_tile_px``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_PX = 13  # font size of the labels
BACKGROUND = (255, 255, 255)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=LABEL_PX)  # Pillow's bundled scalable font
    except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(tiles: torch.Tensor, row_labels: Sequence[str] | None = None,
                  column_labels: Sequence[str] | None = None, min_tile_px: int = 96, padding: int = 4) -> torch.Tensor:
    """Lay out ``tiles`` (R, K, C, H, W) in [0, 1] as R rows of K, enlarged and labelled.

    Args:
        tiles: R rows of K images; C is 1 (grey) or 3.
        row_labels: R strings drawn left of the rows (e.g. class names), or None.
        column_labels: K strings drawn above the columns (e.g. original | masked | reconstruction), or None.
        min_tile_px: each tile is enlarged by the smallest whole factor that makes it at least this tall.
        padding: white pixels between tiles.

    Returns:
        (3, height, width) float tensor in [0, 1], ready for ``tracking.log_image``.
    """
    if tiles.ndim != 5 or tiles.shape[2] not in (1, 3):
        raise ValueError(f"tiles must be (rows, columns, 1 or 3, H, W), got {tuple(tiles.shape)}")
    rows, columns, _, height, width = tiles.shape
    for name, labels, count in (("row_labels", row_labels, rows), ("column_labels", column_labels, columns)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{name}: {len(labels)} labels for {count} {name.split('_')[0]}s")
    scale = max(1, -(-min_tile_px // height))
    big = tiles.detach().float().cpu().clamp(0, 1).expand(-1, -1, 3, -1, -1)
    big = big.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # (R, K, 3, sH, sW)
    tile_h, tile_w = height * scale, width * scale

    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = lambda text: int(measure.textlength(text, font=font))  # noqa: E731
    left = padding + (max(map(text_width, row_labels)) + padding if row_labels else 0)
    top = padding + (LABEL_PX + 2 * padding if column_labels else 0)
    canvas = Image.new("RGB", (left + columns * (tile_w + padding), top + rows * (tile_h + padding)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = big.permute(0, 1, 3, 4, 2).mul(255).round().byte().numpy()  # (R, K, sH, sW, 3)
    for r in range(rows):
        y = top + r * (tile_h + padding)
        if row_labels:
            draw.text((padding, y + tile_h // 2), row_labels[r], fill=(0, 0, 0), font=font, anchor="lm")
        for k in range(columns):
            canvas.paste(Image.fromarray(pixels[r, k]), (left + k * (tile_w + padding), y))
    for k, label in enumerate(column_labels or []):
        x = left + k * (tile_w + padding) + tile_w // 2
        draw.text((x, padding + LABEL_PX // 2), label, fill=(0, 0, 0), font=font, anchor="mm")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def rows_of(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, C, H, W) → (ceil(N / columns), columns, C, H, W), the last row padded with white."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    padded = torch.ones(rows * columns, c, h, w, dtype=images.dtype, device=images.device)
    padded[:n] = images
    return padded.view(rows, columns, c, h, w)
