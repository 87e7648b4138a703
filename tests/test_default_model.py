"""sdrt's shipped default model (models/sdrt-shapes): builds with ONNX Runtime, draws what it is asked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from sdrt.benchmarks.shapes_accuracy import prompt_set, score  # noqa: E402
from sdrt.image_io import read_metadata  # noqa: E402
from sdrt.pipeline import StableDiffusion  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "sdrt-shapes"
# Measured on 120 seen (prompt, seed) pairs with the model's defaults (see the model card): the
# threshold sits well below it, far above what an untrained or broken pipeline reaches (about 4%).
MIN_COLOR_SHAPE = 75.0
MIN_BACKGROUND = 90.0


@pytest.fixture(scope="module")
def engines(shapes_engines):
    return shapes_engines


def test_model_is_small_and_fp16():
    weights = list(MODEL.rglob("*.safetensors"))
    assert len(weights) == 3
    assert sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) <= 30 * 2**20
    for path in weights:
        with open(path, "rb") as f:  # safetensors: u64 little-endian header size, then the JSON header
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}, path


def test_prompt_accuracy_stays_up(engines):
    pipe = StableDiffusion.from_engine_folder(engines)
    try:
        result = score(pipe, prompt_set(24, held_out=False, seed=7))
    finally:
        pipe.close()
    assert result["accuracy"]["color_shape"] >= MIN_COLOR_SHAPE, result
    assert result["accuracy"]["background"] >= MIN_BACKGROUND, result


def test_generate_alone_uses_the_models_defaults(engines, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", engines, "--prompt", "a red circle on a white background",
                             "--output", out, "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    defaults = json.loads((MODEL / "sdrt.json").read_text())["defaults"]
    meta = read_metadata(out)
    assert (meta["height"], meta["width"], meta["steps"], meta["guidance"], meta["scheduler"]) == (
        defaults["height"], defaults["width"], defaults["steps"], defaults["guidance"], defaults["scheduler"])
    assert "draws well" not in result.stderr  # the defaults are inside the card's range: no warning


def test_info_and_generate_tell_where_the_model_draws_well(engines, tmp_path):
    works = json.loads((MODEL / "sdrt.json").read_text())["works"]
    info = subprocess.run([sys.executable, "-m", "sdrt.cli", "info", engines], capture_output=True, text=True)
    assert "recommended: 64x64, 20 steps, guidance 5, scheduler dpmpp_2m" in info.stdout and "draws well:  " in info.stdout
    outside = next(s for s in ("ddim", "pndm", "lms") if s not in works["schedulers"])
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", engines, "--prompt", "a red circle on a white background",
                             "--scheduler", outside, "--steps", "4", "--output", tmp_path / "o.png", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.count("this model's card says it draws well with") == 1, result.stderr


def test_grid_is_labelled(engines, tmp_path):
    from PIL import Image

    prompts = ["a red circle on a white background", "a large blue square on a gray background"]
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "grid", engines, *[a for p in prompts for a in ("--prompt", p)], "--seeds", "2",
                             "--scheduler", "Euler a", "--negative-prompt", "blurry", "--output", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (18 + 2 * (18 + 64 + 2), 2 * 64 + 2, 3)
    for top in (0, 18, 18 + 18 + 64 + 2):  # the seed strip and the label strip above each row: dark text on white
        strip = grid[top : top + 18]
        assert (strip < 100).any() and (strip == 255).mean() > 0.5
    meta = read_metadata(out)
    assert meta["prompts"] == prompts and meta["scheduler"] == "euler_a" and meta["negative_prompt"] == "blurry"
