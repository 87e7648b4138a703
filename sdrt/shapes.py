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


def read_scene(image: np.ndarray) -> dict[str, str]:
    """What an (H, W, 3) uint8 image shows: background, color, shape, size, position ("none" if no shape)."""
    pixels = image.astype(np.float64)
    side = image.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    found = {"background": _nearest(bg_rgb, BACKGROUNDS)}
    mask = np.linalg.norm(pixels - bg_rgb, axis=2) > 60
    if mask.sum() < 0.005 * mask.size:
        return {**found, "color": "none", "shape": "none", "size": "none", "position": "none"}
    ys, xs = np.nonzero(mask)
    found["color"] = _nearest(np.median(pixels[mask], axis=0), COLORS)
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    found["shape"] = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
    found["size"] = "large" if extent > (RADIUS["small"] + RADIUS["large"]) else "small"
    centroid = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]) / side
    found["position"] = min(POSITIONS, key=lambda p: np.linalg.norm(centroid - np.array(POSITIONS[p])))
    return found


def evaluate(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per attribute the prompt names: does the image match it?"""
    wanted, found = parse_prompt(prompt), read_scene(image)
    return {key: found[key] == value for key, value in wanted.items()}
