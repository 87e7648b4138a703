"""Images a user gives (init images, inpainting images and masks): read as diffusers' `load_image` reads
them, and turned into model inputs as diffusers' `VaeImageProcessor` does (Lanczos resize, [0, 1] or
[-1, 1], masks binarized at 0.5), without torch."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import SdrtError

MAX_PIXELS_ENV = "SDRT_MAX_IMAGE_PIXELS"
MAX_PIXELS = 2**26  # 67 megapixels (8192 x 8192): decoding alone takes 200 MB; more is refused before decoding
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def max_pixels() -> int:
    value = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        return int(value) if value else MAX_PIXELS
    except ValueError:
        raise SdrtError(f"{MAX_PIXELS_ENV}={value!r} is not an integer number of pixels") from None


def load_image(path: Path, option: str) -> Image.Image:
    """The file as an 8-bit RGB image, upright: EXIF orientation applied, alpha dropped (as diffusers'
    `load_image` does), 16-bit and float greyscale scaled to 8 bits. One clear error for anything else."""
    if not path.is_file():
        raise SdrtError(f"{option} {path} does not exist" if not path.exists() else f"{option} {path} is not a file")
    return _open(path, f"{option} {path}")


def load_image_bytes(data: bytes, field: str) -> Image.Image:
    """`load_image` for an image sent in a request (`field` names it in errors)."""
    return _open(io.BytesIO(data), field)


def _open(source, what: str) -> Image.Image:
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on palette transparency and large images
            with Image.open(source) as image:
                if image.width * image.height > limit:
                    raise SdrtError(f"{what} is {image.width}x{image.height} ({image.width * image.height / 1e6:.0f} megapixels); "
                                    f"images above {limit / 1e6:.0f} megapixels are refused: scale it down, or set {MAX_PIXELS_ENV}")
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.mode in HIGH_DEPTH_MODES:
                    image = _to_8bit(image)
                return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise SdrtError(f"{what} is not an image Pillow can read ({exc.__class__.__name__}); "
                        "accepted: PNG, JPEG, WebP, BMP, TIFF, GIF") from None
    except OSError as exc:
        raise SdrtError(f"{what} could not be read: {exc.strerror or exc}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = values * 255 if values.max(initial=0) <= 1 else values  # float images in [0, 1], else already 0 .. 255
    else:
        scaled = values / 257  # 0 .. 65535 -> 0 .. 255
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8), mode="L")


def default_size(image: Image.Image, factor: int) -> tuple[int, int]:
    """(height, width): the image's size rounded down to a multiple of the VAE scale factor (diffusers' default)."""
    return image.height - image.height % factor, image.width - image.width % factor


def image_tensor(image: Image.Image, height: int, width: int, resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """-> (1, 3, H, W) float32 in [-1, 1]: VaeImageProcessor.preprocess for an RGB image (its resample: Lanczos,
    bicubic for the x4 upscaler)."""
    resized = image.resize((width, height), resample=resample)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    return (np.float32(2.0) * pixels - np.float32(1.0)).transpose(2, 0, 1)[None].copy()


def mask_tensor(mask: Image.Image, height: int, width: int, blur: float = 0.0) -> np.ndarray:
    """-> (1, 1, H, W) float32 of 0 (keep) and 1 (repaint, white in the file): VaeImageProcessor with
    do_binarize and do_convert_grayscale, after its `blur` (a Gaussian blur of radius `blur`) if asked."""
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    resized = mask.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L")
    values = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return (values >= 0.5).astype(np.float32)[None, None]
