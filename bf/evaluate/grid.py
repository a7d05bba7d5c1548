"""Image grids as in the paper's comparison figures: prompts down, columns across."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from bf.atomic import atomic_path


def save_grid(path: Path, rows: list[str], columns: list[str], cells: list[list[np.ndarray]]) -> None:
    from PIL import Image, ImageDraw, ImageFont

    h, w = cells[0][0].shape[:2]
    label_w, header_h, pad = 200, 28, 4
    grid = Image.new("RGB", (label_w + len(columns) * (w + pad), header_h + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for j, col in enumerate(columns):
        draw.text((label_w + j * (w + pad) + 2, 4), col[: w // 6], fill="black", font=font)
    for i, row in enumerate(rows):
        y = header_h + i * (h + pad)
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(row, 30)[:6]), fill="black", font=font)
        for j, img in enumerate(cells[i]):
            grid.paste(Image.fromarray(img), (label_w + j * (w + pad), y))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
