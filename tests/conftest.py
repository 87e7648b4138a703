"""Fixtures: tiny random-weight SD1/SD2 models in diffusers format and engines built from them."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    """Builds in tests fill a cache of their own, never the user's ~/.cache/sdrt: one per run, made by the
    controller and shared by the xdist workers (which inherit its environment), so that a model exported on
    one worker is not exported again on the other. Each xdist worker runs on a core of its own (sdrt,
    torch and the subprocesses it starts follow the affinity): two workers whose thread pools each took
    every core would spin against each other."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ["SDRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdrt-test-cache-")
    worker, cores = os.environ.get("PYTEST_XDIST_WORKER", ""), sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and 1 < workers <= len(cores):
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _shared(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once per test run, shared by the xdist workers (the first builds under a lock, the
    others wait and reuse: each would otherwise build every model and engine folder again)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, common to its workers
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


def _random_model(kind: str, folder: Path) -> None:
    from sdrt.exporters.random_models import make_random_model

    make_random_model(kind, folder)


def _engines(model: Path, folder: Path) -> None:
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    build_engines(model, folder, BuildConfig(backend="onnxruntime"))


def _models(tmp_path_factory, kinds: tuple[str, ...]) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    return {kind: _shared(tmp_path_factory, f"model-{kind}", lambda folder, kind=kind: _random_model(kind, folder)) for kind in kinds}


def _built(tmp_path_factory, models: dict[str, Path]) -> dict[str, Path]:
    return {kind: _shared(tmp_path_factory, f"engines-{kind}", lambda folder, model=model: _engines(model, folder)) for kind, model in models.items()}


SHAPES_MODEL = Path(__file__).resolve().parents[1] / "models" / "sdrt-shapes"


@pytest.fixture(scope="session")
def openvino_engines(tmp_path_factory):
    """(model kind, precision) -> OpenVINO engines of that tiny model (or of "sdrt-shapes", the shipped
    model), built the first time a test asks and shared by the run's workers."""
    pytest.importorskip("openvino")

    def build(model: Path, precision: str, folder: Path, accuracy_prompts: int) -> None:
        from sdrt.engines.base import BuildConfig
        from sdrt.exporters.build import build_engines

        build_engines(model, folder, BuildConfig(backend="openvino", precision=precision, calibration_prompts=1, calibration_steps=4,
                                                 accuracy_prompts=accuracy_prompts, accuracy_steps=4))  # small: the suite has 5 minutes

    def engines(kind: str, precision: str = "fp32") -> Path:
        model = SHAPES_MODEL if kind == "sdrt-shapes" else _models(tmp_path_factory, (kind,))[kind]
        accuracy_prompts = 1 if kind in ("sd1", "sd2") else 0  # the accuracy reports test_precisions reads
        return _shared(tmp_path_factory, f"engines-{kind}-openvino-{precision}", lambda folder: build(model, precision, folder, accuracy_prompts))

    return engines


@pytest.fixture(scope="session")
def shapes_engines(tmp_path_factory) -> Path:
    """onnxruntime fp32 engines of the shipped default model (models/sdrt-shapes)."""
    pytest.importorskip("diffusers")
    return _shared(tmp_path_factory, "engines-sdrt-shapes", lambda folder: _engines(SHAPES_MODEL, folder))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return _models(tmp_path_factory, ("sd1", "sd2"))


@pytest.fixture(scope="session")
def tiny_engines(tiny_models, tmp_path_factory) -> dict[str, Path]:
    return _built(tmp_path_factory, tiny_models)


@pytest.fixture(scope="session")
def tiny_inpaint_models(tmp_path_factory) -> dict[str, Path]:
    """9-channel inpainting U-Nets (StableDiffusionInpaintPipeline folders)."""
    return _models(tmp_path_factory, ("sd1-inpaint", "sd2-inpaint"))


@pytest.fixture(scope="session")
def tiny_inpaint_engines(tiny_inpaint_models, tmp_path_factory) -> dict[str, Path]:
    return _built(tmp_path_factory, tiny_inpaint_models)


def _model_and_engines(tmp_path_factory, kind: str) -> tuple[Path, Path]:
    models = _models(tmp_path_factory, (kind,))
    return models[kind], _built(tmp_path_factory, models)[kind]


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2 depth-to-image model with a DPT depth estimator."""
    return _model_and_engines(tmp_path_factory, "sd2-depth")


@pytest.fixture(scope="session")
def tiny_upscaler(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2-style x4 upscaler."""
    return _model_and_engines(tmp_path_factory, "sd2-upscale")


@pytest.fixture(scope="session")
def tiny_unclip(tmp_path_factory) -> tuple[Path, Path]:
    """(model, engines) of a tiny SD2-style Stable unCLIP model."""
    return _model_and_engines(tmp_path_factory, "sd2-unclip")


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
