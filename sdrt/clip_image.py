"""The CLIP image processor (transformers' CLIPImageProcessorPil) in NumPy and Pillow: the shortest edge
resized to `size`, a centre crop, rescale, normalise. For unCLIP's image encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .depth import RESAMPLE
from .errors import SdrtError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def read_clip_processor(path: Path) -> dict:
    """The settings of a CLIP image processor config that sdrt reproduces; an error naming any other."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} could not be read as JSON: {exc}") from None
    for key in ("do_resize", "do_center_crop"):
        if config.get(key, True) is not True:
            raise SdrtError(f"{path}: {key} = {config[key]!r} is not supported (accepted: true)")
    size, crop = config.get("size", {"shortest_edge": 224}), config.get("crop_size", {"height": 224, "width": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(size, dict) or set(size) != {"shortest_edge"} or not isinstance(crop, dict) or set(crop) != {"height", "width"}:
        raise SdrtError(f"{path}: size {size!r} / crop_size {crop!r} are not supported (accepted: shortest_edge, and height + width)")
    resample = config.get("resample", 3)
    if resample not in RESAMPLE:
        raise SdrtError(f"{path}: resample {resample!r} is not supported (accepted: {', '.join(map(str, RESAMPLE))})")
    return {"shortest_edge": size["shortest_edge"], "crop_height": crop["height"], "crop_width": crop["width"], "resample": resample,
            "do_rescale": bool(config.get("do_rescale", True)), "rescale_factor": float(config.get("rescale_factor", 1 / 255)),
            "do_normalize": bool(config.get("do_normalize", True)), "image_mean": list(config.get("image_mean", CLIP_MEAN)),
            "image_std": list(config.get("image_std", CLIP_STD))}


def clip_pixel_values(image: Image.Image, processor: dict) -> np.ndarray:
    """(1, 3, crop_height, crop_width) float32 from an RGB image, as CLIPImageProcessorPil makes it."""
    short, long = sorted((image.width, image.height))
    new_short, new_long = processor["shortest_edge"], int(processor["shortest_edge"] * long / short)
    size = (new_short, new_long) if image.width <= image.height else (new_long, new_short)  # (width, height)
    resized = np.asarray(image.resize(size, resample=RESAMPLE[processor["resample"]]))
    top, left = (resized.shape[0] - processor["crop_height"]) // 2, (resized.shape[1] - processor["crop_width"]) // 2
    if top < 0 or left < 0:
        raise SdrtError(f"the CLIP image processor's crop {processor['crop_width']}x{processor['crop_height']} is larger than the "
                        f"resized image {size[0]}x{size[1]}")
    pixels = resized[top : top + processor["crop_height"], left : left + processor["crop_width"]].transpose(2, 0, 1)
    if processor["do_rescale"]:
        pixels = (pixels.astype(np.float64) * processor["rescale_factor"]).astype(np.float32)
    if processor["do_normalize"]:
        mean = np.asarray(processor["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(processor["image_std"], dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels.astype(np.float32)[None]
