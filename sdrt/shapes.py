"""The shapes world of sdrt's own default model: caption grammar, renderer and semantic evaluator.

    a [small|large] {color} {shape} [on the left|on the right|at the top|at the bottom|in the center]
    on a {background} background

One filled shape on a plain background. Bracketed parts may be left out of a caption; the image
then picks them at random. The renderer draws the training data; the evaluator reads a generated
image and says whether its color, shape, position, size and background match a prompt (NumPy
only: background from the border, shape mask from the difference, color by nearest named color,
shape from the mask's fill of its bounding box, position from the centroid).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": COLORS["white"], "black": COLORS["black"], "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = {  # phrase -> anchor (x, y) as fractions of the image side
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
HELD_OUT = {("green", "triangle"), ("purple", "square"), ("orange", "circle"), ("yellow", "triangle")}
RADIUS = {"small": 0.13, "large": 0.22}  # half the shape's extent, as a fraction of the image side


@dataclasses.dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    size: str
    position: str


def valid(color: str, background: str) -> bool:
    return color != background


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A scene whose color+shape pair is seen in training (or held out, with `held_out`)."""
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        background = rng.choice(list(BACKGROUNDS))
        if valid(color, background) and ((color, shape) in HELD_OUT) == held_out:
            return Scene(color, shape, background, rng.choice(SIZES), rng.choice(list(POSITIONS)))


def caption(scene: Scene, with_size: bool = True, with_position: bool = True) -> str:
    size = f"{scene.size} " if with_size else ""
    position = f" {scene.position}" if with_position else ""
    return f"a {size}{scene.color} {scene.shape}{position} on a {scene.background} background"


def render(scene: Scene, side: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """-> (side, side, 3) uint8. `rng` jitters the position and size a little."""
    jitter = (lambda s: rng.uniform(-s, s)) if rng is not None else (lambda s: 0.0)
    ax, ay = POSITIONS[scene.position]
    cx, cy = (ax + jitter(0.04)) * side, (ay + jitter(0.04)) * side
    r = (RADIUS[scene.size] + jitter(0.015)) * side
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return np.asarray(image)


PROMPT = re.compile(
    r"^a (?:(?P<size>small|large) )?(?P<color>\w+) (?P<shape>\w+)(?: (?P<position>on the left|on the right|at the top|"
    r"at the bottom|in the center))? on a (?P<background>\w+) background$"
)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a grammar prompt names (size and position only when given)."""
    match = PROMPT.match(prompt.strip().lower())
    if not match or match["color"] not in COLORS or match["shape"] not in SHAPES or match["background"] not in BACKGROUNDS:
        raise ValueError(f"not a prompt of the shapes grammar: {prompt!r}")
    return {k: v for k, v in match.groupdict().items() if v is not None}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(dist.argmin())]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels of a generated image dropped)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best


def _template(shape: str, xs: np.ndarray, ys: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    image = Image.new("1", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=1)
    return np.asarray(image, dtype=bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def read_scene(image: np.ndarray) -> dict[str, str]:
    """What an (H, W, 3) uint8 image shows: background, color, shape, size, position ("none" if no shape)."""
    pixels = image.astype(np.float64)
    side = image.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    found = {"background": _nearest(bg_rgb, BACKGROUNDS)}
    mask = np.linalg.norm(pixels - bg_rgb, axis=2) > 80
    if mask.sum() < 0.005 * mask.size:
        return {**found, "color": "none", "shape": "none", "size": "none", "position": "none"}
    mask = _largest_component(mask)
    ys, xs = np.nonzero(mask)
    found["color"] = _nearest(np.median(pixels[mask], axis=0), COLORS)
    # shape: the template, drawn into the mask's bounding box, that overlaps the mask best (IoU)
    found["shape"] = max(SHAPES, key=lambda shape: _iou(mask, _template(shape, xs, ys, mask.shape)))
    # size: the side of a square of the same area, against the midpoint of the small and large sizes
    area_side = np.sqrt(mask.sum() / {"square": 3.24, "circle": np.pi, "triangle": 1.8}[found["shape"]]) / side
    found["size"] = "large" if area_side > (RADIUS["small"] + RADIUS["large"]) / 2 else "small"
    # position: the anchor nearest the centre of the bounding box
    centroid = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]) / side
    found["position"] = min(POSITIONS, key=lambda p: np.linalg.norm(centroid - np.array(POSITIONS[p])))
    return found


def evaluate(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per attribute the prompt names: does the image match it?"""
    wanted, found = parse_prompt(prompt), read_scene(image)
    return {key: found[key] == value for key, value in wanted.items()}
