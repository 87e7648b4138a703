"""The invisible watermark against the `invisible-watermark` package that SD's reference scripts use:
sdrt's NumPy dwtDct gives the package's encoder output bit for bit, and its decoder reads the text back."""

import numpy as np
import pytest
from PIL import Image

from sdrt import watermark
from sdrt.errors import SdrtError

imwatermark = pytest.importorskip("imwatermark")
cv2 = pytest.importorskip("cv2")
pywt = pytest.importorskip("pywt")


def smooth_picture(size, seed, grid):
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC))


def test_colour_conversions_and_haar_match_opencv_and_pywavelets():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(watermark._to_yuv(rgb), cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2YUV))
    assert np.array_equal(watermark._to_rgb(rgb), cv2.cvtColor(rgb, cv2.COLOR_YUV2BGR)[..., ::-1])
    x = rng.integers(0, 256, (36, 52)).astype(np.uint8)
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(x, "haar")
    for ours, theirs in zip(watermark._haar(x), (approx, horizontal, vertical, diagonal)):
        assert np.array_equal(ours, theirs)
    assert np.array_equal(watermark._inverse_haar(approx, horizontal, vertical, diagonal), pywt.idwt2((approx, (horizontal, vertical, diagonal)), "haar"))


@pytest.mark.parametrize("size,seed,grid", [((256, 256), 4, 16), ((300, 270), 5, 8), ((512, 512), 6, 32), ((640, 384), 7, 12)])
def test_embedding_is_the_packages_bit_for_bit(size, seed, grid):
    image = smooth_picture(size, seed, grid)
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", "SDV2".encode())
    theirs = encoder.encode(image[..., ::-1].copy(), "dwtDct")[..., ::-1]
    ours = watermark.embed(image, "SDV2")
    assert np.array_equal(ours, theirs)
    assert 0 < np.abs(ours.astype(int) - image).mean() < 3  # invisible: about 1-2 levels per pixel


def test_the_package_reads_sdrt_pngs(tmp_path):
    """dwtDct is fragile (the package itself fails to read its mark back from many images): this image is
    one it reads; the bit-for-bit test above covers the others."""
    from sdrt.image_io import save_png

    image = watermark.embed(smooth_picture((512, 512), 6, 32), "SDV2")
    save_png(image, tmp_path / "marked.png", {})
    bgr = np.asarray(Image.open(tmp_path / "marked.png"))[..., ::-1].copy()
    assert imwatermark.WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct") == b"SDV2"


def test_bad_watermark_requests():
    with pytest.raises(SdrtError, match="--watermark is empty"):
        watermark.embed(smooth_picture((256, 256), 0, 8), "")
    with pytest.raises(SdrtError, match="at least 256x256"):
        watermark.embed(smooth_picture((128, 128), 0, 8), "SDV2")
