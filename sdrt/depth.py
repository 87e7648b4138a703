"""Depth conditioning of depth-to-image models (diffusers' StableDiffusionDepth2ImgPipeline), without torch:
the DPT depth estimator's image processor (transformers' DPTImageProcessorPil), torch's bicubic
resize, and the min-max normalisation to [-1, 1] at latent size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import SdrtError

RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR, 3: Image.Resampling.BICUBIC,
            4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_dpt_processor(path: Path) -> dict:
    """The settings of a DPT image processor config that sdrt reproduces; an error naming any other."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} could not be read as JSON: {exc}") from None
    unsupported = {"keep_aspect_ratio": False, "do_pad": False, "do_reduce_labels": False, "do_resize": True}
    for key, accepted in unsupported.items():
        if config.get(key, accepted) != accepted:
            raise SdrtError(f"{path}: {key} = {config[key]!r} is not supported (accepted: {accepted})")
    size = config.get("size", {"height": 384, "width": 384})
    if not isinstance(size, dict) or not {"height", "width"} <= set(size):
        raise SdrtError(f"{path}: size {size!r} is not supported (accepted: {{'height': H, 'width': W}})")
    multiple = int(config.get("ensure_multiple_of", 1))
    resample = config.get("resample", 3)
    if resample not in RESAMPLE:
        raise SdrtError(f"{path}: resample {resample!r} is not supported (accepted: {', '.join(map(str, RESAMPLE))})")
    return {
        "height": round(size["height"] / multiple) * multiple, "width": round(size["width"] / multiple) * multiple,
        "resample": resample, "do_rescale": bool(config.get("do_rescale", True)), "rescale_factor": float(config.get("rescale_factor", 1 / 255)),
        "do_normalize": bool(config.get("do_normalize", True)), "image_mean": list(config.get("image_mean", [0.5, 0.5, 0.5])),
        "image_std": list(config.get("image_std", [0.5, 0.5, 0.5])),
    }


def dpt_pixel_values(image: Image.Image, processor: dict) -> np.ndarray:
    """(1, 3, h, w) float32: DPTImageProcessorPil on an RGB image (resize, rescale, normalize)."""
    resized = image.resize((processor["width"], processor["height"]), resample=RESAMPLE[processor["resample"]])
    pixels = np.asarray(resized).transpose(2, 0, 1)  # (3, h, w) uint8
    if processor["do_rescale"]:
        pixels = (pixels.astype(np.float64) * processor["rescale_factor"]).astype(np.float32)
    if processor["do_normalize"]:
        mean = np.asarray(processor["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(processor["image_std"], dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels.astype(np.float32)[None]


def load_depth_map(path: Path) -> np.ndarray:
    """A depth map file (brighter = nearer, as DPT outputs) -> (H, W) float32, 16-bit and float values kept."""
    if not path.is_file():
        raise SdrtError(f"--depth-map {path} does not exist" if not path.exists() else f"--depth-map {path} is not a file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode not in HIGH_DEPTH_MODES:
                image = image.convert("L")
            depth = np.asarray(image, dtype=np.float32)
    except (OSError, Image.DecompressionBombError) as exc:
        raise SdrtError(f"--depth-map {path} is not an image Pillow can read ({exc.__class__.__name__}); "
                        "accepted: greyscale PNG (8 or 16 bit), TIFF (float), JPEG, WebP") from None
    if not np.isfinite(depth).all() or depth.max() == depth.min():
        raise SdrtError(f"--depth-map {path} is flat or not finite: a depth map needs at least two different depths")
    return depth


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """(n,) fractional offsets -> (n, 4) weights of the neighbours at -1, 0, 1, 2 (Keys' cubic, torch's A = -0.75)."""
    t = t.astype(np.float32)
    a = np.float32(a)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far(np.float32(2) - t)], axis=1)


def _bicubic_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    scale = np.float32(n / size)
    src = scale * (np.arange(size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)  # (size, 4)
    out = 0
    for k in range(4):
        index = np.clip(base - 1 + k, 0, n - 1)
        shape = [1] * x.ndim
        shape[axis] = size
        out = out + np.take(x, index, axis=axis) * weights[:, k].reshape(shape)
    return out.astype(np.float32)


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) float32 -> (..., height, width): torch's interpolate(mode="bicubic", align_corners=False),
    no antialiasing (also when shrinking), borders clamped."""
    return _bicubic_axis(_bicubic_axis(x.astype(np.float32), width, x.ndim - 1), height, x.ndim - 2)


def depth_condition(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) depth -> (1, 1, height, width) float32 in [-1, 1]: resized bicubically, min-max normalised."""
    resized = bicubic_resize(depth[None, None], height, width)
    low, high = resized.min(), resized.max()
    if not math.isfinite(float(high - low)) or high == low:
        raise SdrtError("the depth map is flat at latent size: no depth to condition on")
    return (np.float32(2.0) * (resized - low) / (high - low) - np.float32(1.0)).astype(np.float32)
