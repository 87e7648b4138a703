"""OpenVINO engines and fp16 / bf16 / int8 / int8-weights builds against fp32 (build options: test_build_options.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import psnr
from helpers import generate

ov = pytest.importorskip("openvino")
pytest.importorskip("torch")

NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="openvino reports no native bf16 on this CPU (needs AVX512_BF16 or AMX)")

from sdrt.engines.base import BuildConfig  # noqa: E402
from sdrt.exporters.build import build_engines  # noqa: E402


@pytest.fixture(scope="module")
def built(tiny_models, openvino_engines, tmp_path_factory):
    """kind/backend/precision -> engine folder, built when a test first asks for it (the OpenVINO ones are shared
    with other modules, and a worker waits only for what its test needs)."""
    root = tmp_path_factory.mktemp("precisions")

    class Built(dict):
        def __missing__(self, key):
            kind, backend, precision = key
            if backend == "openvino":
                self[key] = openvino_engines(kind, precision)
            else:
                self[key] = root / "-".join(key)
                build_engines(tiny_models[kind], self[key], BuildConfig(precision=precision, calibration_prompts=2, calibration_steps=4,
                                                                        accuracy_prompts=1, accuracy_steps=4))  # small: the suite has 5 minutes
            return self[key]

    return Built()


@pytest.mark.parametrize("kind,scheduler", [("sd1", "dpmpp_2m"), ("sd1", "euler_a"), ("sd2", "ddim")])
def test_openvino_fp32_matches_onnxruntime_fp32(kind, scheduler, built, tiny_engines):
    ours = generate(built[kind, "openvino", "fp32"], scheduler=scheduler, steps=12)
    reference = generate(tiny_engines[kind], scheduler=scheduler, steps=12)
    assert reference[0].std() > 2
    # fp32 means fp32: OpenVINO's CPU default on bf16-capable CPUs (bf16) read 46-51 dB here
    assert psnr(ours[0], reference[0]) >= 70
    manifest = json.loads((built[kind, "openvino", "fp32"] / "manifest.json").read_text())
    assert manifest["backend"]["compute"] == "f32" and manifest["accuracy"]["min_image_psnr_db"] >= 70


@pytest.mark.parametrize("key", [("sd1", "openvino", "int8"), ("sd1", "onnxruntime", "int8"), ("sd1", "openvino", "int8-weights"),
                                 ("sd2", "openvino", "fp16"), pytest.param(("sd1", "openvino", "bf16"), marks=needs_bf16)])
def test_reduced_precision_builds_run_and_record_their_accuracy(key, built):
    manifest = json.loads((built[key] / "manifest.json").read_text())
    assert manifest["precision"] == key[2]
    accuracy = manifest["accuracy"]
    assert len(accuracy["image_psnr_db"]) == 1 and np.isfinite(accuracy["min_image_psnr_db"])
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        component = accuracy["components"][name]
        assert 0 <= component["max_abs_error"] < 10 and 0.9 < component["cosine_similarity"] <= 1.0 + 1e-9, (name, component)
    image = generate(built[key], steps=8)[0]
    assert image.shape == (16, 16, 3) if key[0] == "sd1" else (32, 32, 3)
    info = subprocess.run([sys.executable, "-m", "sdrt.cli", "info", built[key]], capture_output=True, text=True)
    assert info.returncode == 0 and "image PSNR vs fp32" in info.stdout and "cosine" in info.stdout


@needs_bf16
def test_bf16_computes_in_bf16(built):
    """Same fp32 weights as the fp32 engine, bf16 arithmetic: close to fp32's image, not equal to it."""
    assert json.loads((built["sd1", "openvino", "bf16"] / "manifest.json").read_text())["backend"]["compute"] == "bf16"
    bf16 = generate(built["sd1", "openvino", "bf16"], steps=8)[0]
    fp32 = generate(built["sd1", "openvino", "fp32"], steps=8)[0]
    assert 25 <= psnr(bf16, fp32) < 70


def test_int8_weights_store_8_bit_weights(built):
    fp32 = sum(p.stat().st_size for p in built["sd1", "openvino", "fp32"].rglob("model.bin"))
    int8 = sum(p.stat().st_size for p in built["sd1", "openvino", "int8-weights"].rglob("model.bin"))
    assert int8 < 0.4 * fp32
