"""The invisible watermark Stable Diffusion's reference scripts put in their images: the `invisible-watermark`
package's dwtDct method (`WatermarkEncoder.set_watermark("bytes", text)`, `encode(bgr, "dwtDct")`, default
scales [0, 36, 36], 4x4 blocks), reproduced in NumPy so that the runtime needs neither OpenCV nor PyWavelets.

The image goes to OpenCV's 8-bit YUV (fixed point, 14-bit coefficients). The method visits channels 0 and 1
only, and Y's scale is 0, so only U carries the mark: a one-level Haar DWT of U, then in each 4x4 block of
the approximation band the largest-magnitude coefficient other than the first is quantized to
(|c| // 36 + 0.25 + 0.5 bit) * 36, bit k of the text going to block k modulo the text's bit count. The
inverse DWT takes the detail bands in the order (V, H, D), not (H, V, D), as the package does; its output
is cast to uint8 as NumPy casts it. Blocks are counted row by row over the U band's top-left multiple of 4.
"""

from __future__ import annotations

import numpy as np

from .errors import SdrtError

SCALE = 36.0
BLOCK = 4
SHIFT = 14
ROUND = 1 << (SHIFT - 1)
HALF = 128
MIN_PIXELS = 256 * 256  # the package refuses smaller images


def _to_yuv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 YUV, as cv2.cvtColor(bgr, COLOR_BGR2YUV)."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    y = (b * 1868 + g * 9617 + r * 4899 + ROUND) >> SHIFT
    u = ((b - y) * 8061 + (HALF << SHIFT) + ROUND) >> SHIFT
    v = ((r - y) * 14369 + (HALF << SHIFT) + ROUND) >> SHIFT
    return np.clip(np.stack([y, u, v], axis=-1), 0, 255).astype(np.uint8)


def _to_rgb(yuv: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 YUV -> uint8 RGB, as cv2.cvtColor(yuv, COLOR_YUV2BGR) then reversed channels."""
    y, u, v = (yuv[..., k].astype(np.int64) - (0, HALF, HALF)[k] for k in range(3))
    b = y + ((u * 33292 + ROUND) >> SHIFT)
    g = y + ((u * -6472 + v * -9519 + ROUND) >> SHIFT)
    r = y + ((v * 18678 + ROUND) >> SHIFT)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


C = 0.7071067811865476  # the Haar filter tap, 1 / sqrt(2), as PyWavelets stores it


def _haar_axis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    even, odd = np.take(x, range(0, x.shape[axis], 2), axis), np.take(x, range(1, x.shape[axis], 2), axis)
    return C * even + C * odd, C * even - C * odd


def _inverse_haar_axis(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    shape = list(low.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=np.float64)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, None, 2)
    out[tuple(index)] = C * low + C * high
    index[axis] = slice(1, None, 2)
    out[tuple(index)] = C * low - C * high
    return out


def _haar(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(2h, 2w) -> approximation, horizontal, vertical and diagonal details (h, w) float64: pywt.dwt2(x, "haar"),
    in its order of operations (rows, then columns), so that the uint8 casts after the inverse agree bit for bit."""
    low, high = _haar_axis(x.astype(np.float64), 0)
    approx, vertical = _haar_axis(low, 1)
    horizontal, diagonal = _haar_axis(high, 1)
    return approx, horizontal, vertical, diagonal


def _inverse_haar(approx: np.ndarray, horizontal: np.ndarray, vertical: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """pywt.idwt2((approx, (horizontal, vertical, diagonal)), "haar"): columns, then rows."""
    return _inverse_haar_axis(_inverse_haar_axis(approx, vertical, 1), _inverse_haar_axis(horizontal, diagonal, 1), 0)


def text_bits(text: str) -> np.ndarray:
    if not text:
        raise SdrtError("--watermark is empty: give the text to embed, e.g. SDV2")
    return np.unpackbits(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))


def embed(image: np.ndarray, text: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the same with `text` embedded."""
    bits = text_bits(text)
    rows, cols = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
    if image.shape[0] * image.shape[1] < MIN_PIXELS:
        raise SdrtError(f"--watermark needs images of at least 256x256 pixels (the dwtDct method's minimum), not {image.shape[1]}x{image.shape[0]}")
    yuv = _to_yuv(image)
    approx, horizontal, vertical, diagonal = _haar(yuv[:rows, :cols, 1])
    k = 0
    for i in range(0, approx.shape[0] // BLOCK * BLOCK, BLOCK):
        for j in range(0, approx.shape[1] // BLOCK * BLOCK, BLOCK):
            pos = int(np.argmax(np.abs(approx[i : i + BLOCK, j : j + BLOCK].reshape(-1)[1:]))) + 1
            y, x = i + pos // BLOCK, j + pos % BLOCK
            magnitude = abs(approx[y, x]) // SCALE + 0.25 + 0.5 * bits[k % len(bits)]
            approx[y, x] = (magnitude if approx[y, x] >= 0 else -magnitude) * SCALE
            k += 1
    yuv[:rows, :cols, 1] = _inverse_haar(approx, vertical, horizontal, diagonal).astype(np.uint8)  # (V, H, D): the package's order
    return _to_rgb(yuv)
