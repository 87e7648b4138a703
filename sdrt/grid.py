"""A grid of images: a row per prompt (its text drawn above the row), a column per seed (labelled on top)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 18  # pixels of a text strip
GAP = 2


def labelled_grid(rows: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str]) -> np.ndarray:
    """rows[r][c]: equal-sized (H, W, 3) uint8 images -> one (H', W', 3) uint8 picture on white, with
    the column labels on top and each row's label above it."""
    h, w, _ = rows[0][0].shape
    columns = len(column_labels)
    width = columns * (w + GAP) - GAP
    height = LABEL_HEIGHT + len(rows) * (LABEL_HEIGHT + h + GAP)
    canvas = Image.new("RGB", (max(width, 1), height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    for c, label in enumerate(column_labels):
        draw.text((c * (w + GAP) + 2, 3), label, fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = LABEL_HEIGHT + r * (LABEL_HEIGHT + h + GAP)
        draw.text((2, top + 3), label, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (c * (w + GAP), top + LABEL_HEIGHT))
    return np.asarray(canvas)
