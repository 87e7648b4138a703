"""User images: read as diffusers' load_image reads them, preprocessed as its VaeImageProcessor does,
and every kind of file a user has (RGBA, greyscale, 16-bit, palette, EXIF-rotated, WebP, JPEG)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import half_mask, picture
from sdrt.errors import SdrtError
from sdrt.image_input import MAX_PIXELS_ENV, image_tensor, load_image, mask_tensor

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.utils import load_image as diffusers_load_image  # noqa: E402


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode,suffix", [("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("P", ".png"), ("RGB", ".jpg"),
                                         ("RGB", ".webp"), ("LA", ".png"), ("CMYK", ".jpg")])
def test_load_image_matches_diffusers(mode, suffix, tmp_path):
    source = picture(37, 29).convert(mode)
    if mode == "RGBA":
        source.putalpha(Image.linear_gradient("L").resize(source.size))
    path = _save(source, tmp_path / f"in{suffix}")
    ours = load_image(path, "--init-image")
    assert ours.mode == "RGB" and ours.size == (37, 29)
    assert np.array_equal(np.asarray(ours), np.asarray(diffusers_load_image(str(path))))


def test_exif_rotation_is_applied(tmp_path):
    source = picture(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _save(source, tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    ours = load_image(path, "--image")
    assert ours.size == (24, 40)
    assert np.array_equal(np.asarray(ours), np.asarray(diffusers_load_image(str(path))))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255 (a white image); sdrt scales them to 8 bits."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    ours = np.asarray(load_image(path, "--image"))
    assert ours.shape == (8, 64, 3)
    np.testing.assert_array_equal(ours[..., 0], (ramp / 257).round().astype(np.uint8))


@pytest.mark.parametrize("size", [(70, 54), (64, 64), (33, 17)])
@pytest.mark.parametrize("factor", [2, 8])
def test_image_and_mask_tensors_match_vae_image_processor(size, factor):
    image, mask = picture(*size), half_mask(*size)
    processor = VaeImageProcessor(vae_scale_factor=factor)
    mask_processor = VaeImageProcessor(vae_scale_factor=factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    height, width = processor.get_default_height_width(image)
    for h, w in ((height, width), (48, 40)):  # the default size, and a resize
        np.testing.assert_array_equal(image_tensor(image, h, w), processor.preprocess(image, height=h, width=w).numpy())
        ref_mask = mask_processor.preprocess(mask, height=h, width=w).numpy()
        assert ref_mask.std() > 0
        np.testing.assert_array_equal(mask_tensor(mask, h, w), ref_mask)
    blurred = mask_processor.preprocess(mask_processor.blur(mask.convert("RGB"), 5), height=height, width=width).numpy()
    np.testing.assert_array_equal(mask_tensor(mask.convert("RGB"), height, width, blur=5), blurred)


def test_unreadable_and_missing_files_are_one_clear_error(tmp_path):
    with pytest.raises(SdrtError, match="--mask .*missing.png does not exist"):
        load_image(tmp_path / "missing.png", "--mask")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SdrtError, match="is not an image Pillow can read.*accepted: PNG, JPEG, WebP"):
        load_image(tmp_path / "notes.png", "--image")
    buffer = io.BytesIO()
    picture(64, 64).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(SdrtError, match="--init-image .*cut.png could not be read"):
        load_image(tmp_path / "cut.png", "--init-image")
    with pytest.raises(SdrtError, match="is not a file"):
        load_image(tmp_path, "--image")


def test_images_above_the_pixel_limit_are_refused_with_the_way_out(tmp_path, monkeypatch):
    path = _save(picture(100, 80), tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(SdrtError, match=f"100x80 .* refused: scale it down, or set {MAX_PIXELS_ENV}"):
        load_image(path, "--init-image")
    monkeypatch.setenv(MAX_PIXELS_ENV, "8000")
    assert load_image(path, "--init-image").size == (100, 80)


@pytest.mark.parametrize("shape,size", [((1, 1, 64, 64), (8, 8)), ((1, 1, 37, 53), (9, 13)), ((1, 1, 10, 7), (31, 29)), ((2, 1, 96, 96), (24, 16))])
def test_bicubic_resize_matches_torch(shape, size):
    from sdrt.depth import bicubic_resize

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bicubic", align_corners=False).numpy()
    assert np.abs(bicubic_resize(x, *size) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_dpt_pixel_values_match_transformers(tmp_path):
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    from sdrt.depth import dpt_pixel_values, read_dpt_processor

    processor = DPTImageProcessorPil(size={"height": 40, "width": 56}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(tmp_path)
    image = picture(90, 70)
    ref = np.asarray(processor(images=image).pixel_values[0])
    ours = dpt_pixel_values(image, read_dpt_processor(tmp_path / "preprocessor_config.json"))[0]
    assert ours.shape == ref.shape == (3, 40, 56)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "keep_aspect_ratio": True}))
    with pytest.raises(SdrtError, match="keep_aspect_ratio = True is not supported"):
        read_dpt_processor(tmp_path / "preprocessor_config.json")


def test_depth_map_files(tmp_path):
    from sdrt.depth import load_depth_map

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(SdrtError, match="--depth-map .*flat.png is flat"):
        load_depth_map(tmp_path / "flat.png")
    with pytest.raises(SdrtError, match="--depth-map .*missing.png does not exist"):
        load_depth_map(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("x")
    with pytest.raises(SdrtError, match="is not an image Pillow can read"):
        load_depth_map(tmp_path / "notes.png")
    picture(20, 10).save(tmp_path / "colour.jpg")
    assert load_depth_map(tmp_path / "colour.jpg").shape == (10, 20)  # colour files are read as their luminance
