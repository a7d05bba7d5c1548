"""Image grids as in the paper's comparison figures: prompts down, columns across."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from bf.atomic import atomic_path

MIN_CELL = 128  # small images are enlarged (nearest neighbour) so labels and shapes stay readable
CHAR_W, LINE_H = 6, 12  # PIL's default bitmap font


def save_grid(path: Path, rows: list[str], columns: list[str], cells: list[list[np.ndarray]]) -> None:
    """Column headers and row labels are wrapped to fit, never cut; newlines in them start a new line."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = cells[0][0].shape[:2]
    zoom = max(1, -(-MIN_CELL // min(h, w)))
    h, w = h * zoom, w * zoom
    label_w, pad = 200, 4

    def wrap(text: str, chars: int) -> list[str]:
        return [line for part in text.split("\n") for line in textwrap.wrap(part, chars, break_long_words=True) or [""]]

    headers = [wrap(c, w // CHAR_W) for c in columns]
    header_h = LINE_H * max((len(x) for x in headers), default=1) + 8
    labels = [wrap(r, label_w // CHAR_W - 1)[: h // LINE_H] for r in rows]
    grid = Image.new("RGB", (label_w + len(columns) * (w + pad), header_h + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for j, lines in enumerate(headers):
        draw.multiline_text((label_w + j * (w + pad) + 2, 4), "\n".join(lines), fill="black", font=font)
    for i, lines in enumerate(labels):
        y = header_h + i * (h + pad)
        draw.multiline_text((4, y + 4), "\n".join(lines), fill="black", font=font)
        for j, img in enumerate(cells[i]):
            tile = Image.fromarray(img)
            grid.paste(tile.resize((w, h), Image.NEAREST) if zoom > 1 else tile, (label_w + j * (w + pad), y))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
