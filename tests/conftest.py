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
def tiny_engines(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for kind, model in tiny_models.items():
        build_engines(model, root / kind, BuildConfig(backend="onnxruntime"))
        out[kind] = root / kind
    return out

