"""Fixtures: tiny random-weight SD1/SD2 models in diffusers format and engines built from them."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    """Builds in tests fill a cache of their own, never the user's ~/.cache/sdrt."""
    os.environ["SDRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdrt-test-cache-")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from sdrt.exporters.random_models import make_random_model

    root = tmp_path_factory.mktemp("models")
    return {kind: make_random_model(kind, root / kind) for kind in ("sd1", "sd2")}


@pytest.fixture(scope="session")
def tiny_inpaint_models(tmp_path_factory) -> dict[str, Path]:
    """9-channel inpainting U-Nets (StableDiffusionInpaintPipeline folders)."""
    pytest.importorskip("diffusers")
    from sdrt.exporters.random_models import make_random_model

    root = tmp_path_factory.mktemp("inpaint-models")
    return {kind: make_random_model(kind, root / kind) for kind in ("sd1-inpaint", "sd2-inpaint")}


@pytest.fixture(scope="session")
def tiny_inpaint_engines(tiny_inpaint_models, tmp_path_factory) -> dict[str, Path]:
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("inpaint-engines")
    for kind, model in tiny_inpaint_models.items():
        build_engines(model, root / kind, BuildConfig(backend="onnxruntime"))
    return {kind: root / kind for kind in tiny_inpaint_models}


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2 depth-to-image model with a DPT depth estimator."""
    pytest.importorskip("diffusers")
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines
    from sdrt.exporters.random_models import make_random_model

    root = tmp_path_factory.mktemp("depth")
    model = make_random_model("sd2-depth", root / "model")
    build_engines(model, root / "engines", BuildConfig(backend="onnxruntime"))
    return model, root / "engines"


@pytest.fixture(scope="session")
def tiny_upscaler(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2-style x4 upscaler."""
    pytest.importorskip("diffusers")
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines
    from sdrt.exporters.random_models import make_random_model

    root = tmp_path_factory.mktemp("upscale")
    model = make_random_model("sd2-upscale", root / "model")
    build_engines(model, root / "engines", BuildConfig(backend="onnxruntime"))
    return model, root / "engines"


@pytest.fixture(scope="session")
def tiny_unclip(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2-style Stable unCLIP model."""
    pytest.importorskip("diffusers")
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines
    from sdrt.exporters.random_models import make_random_model

    root = tmp_path_factory.mktemp("unclip")
    model = make_random_model("sd2-unclip", root / "model")
    build_engines(model, root / "engines", BuildConfig(backend="onnxruntime"))
    return model, root / "engines"


def picture(width: int, height: int, seed: int = 0):
    """A PIL RGB picture with structure at every scale: a smooth colour field, a disc and a bar."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(220, 30, 30))
    draw.rectangle((width // 2, 2 * height // 3, width - 3, height - 4), fill=(20, 40, 200))
    return image


def half_mask(width: int, height: int):
    """White (repaint) over the right half's middle, black elsewhere, mode L."""
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 2 :] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="session")
def tiny_engines(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for kind, model in tiny_models.items():
        build_engines(model, root / kind, BuildConfig(backend="onnxruntime"))
        out[kind] = root / kind
    return out

