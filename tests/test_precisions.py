"""OpenVINO engines, fp16 / int8 / int8-weights builds, the accuracy gate, static shapes, the build cache."""

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
from sdrt.engines.cache import BuildCache  # noqa: E402
from sdrt.errors import SdrtError  # noqa: E402
from sdrt.exporters.build import build_engines  # noqa: E402


@pytest.fixture(scope="module")
def built(tiny_models, openvino_engines, tmp_path_factory):
    """kind/backend/precision -> engine folder, built once for the module (OpenVINO ones shared with other modules)."""
    root, out = tmp_path_factory.mktemp("precisions"), {}
    for kind, precision in [("sd1", "fp32"), ("sd2", "fp32"), ("sd1", "int8"), ("sd1", "int8-weights"), ("sd2", "fp16")] + [("sd1", "bf16")] * NATIVE_BF16:
        out[kind, "openvino", precision] = openvino_engines(kind, precision)
    out["sd1", "onnxruntime", "int8"] = root / "sd1-onnxruntime-int8"
    build_engines(tiny_models["sd1"], root / "sd1-onnxruntime-int8", BuildConfig(precision="int8", calibration_prompts=2, calibration_steps=4,
                                                                                 accuracy_prompts=1, accuracy_steps=4))
    return out


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


def test_bf16_is_refused_where_it_is_not_native(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(ov.Core, "get_property", lambda self, device, name: ["FP32", "INT8"])
    with pytest.raises(SdrtError, match="--precision bf16 needs native bf16 .*FP32, INT8"):
        build_engines(tiny_models["sd1"], tmp_path / "x", BuildConfig(backend="openvino", precision="bf16"))
    assert not (tmp_path / "x").exists()


def test_int8_weights_store_8_bit_weights(built):
    fp32 = sum(p.stat().st_size for p in built["sd1", "openvino", "fp32"].rglob("model.bin"))
    int8 = sum(p.stat().st_size for p in built["sd1", "openvino", "int8-weights"].rglob("model.bin"))
    assert int8 < 0.4 * fp32


def test_gate_fails_an_impossible_threshold(tiny_models, tmp_path):
    out = tmp_path / "gated"
    with pytest.raises(SdrtError, match="--min-psnr 1000.*no engine folder was written"):
        build_engines(tiny_models["sd1"], out, BuildConfig(precision="int8", int8_method="dynamic", min_psnr=1000))  # the quickest lossy build
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cache_reuses_and_invalidates(tiny_models, tmp_path):
    cache = BuildCache(tmp_path / "cache")
    cfg = BuildConfig(precision="int8", accuracy_prompts=0, calibration_steps=3)  # onnxruntime: calibrates faster than NNCF
    first = build_engines(tiny_models["sd1"], tmp_path / "a", cfg, cache=cache)
    assert first["export_cache"] == "miss" and {c["cache"] for c in first["components"].values()} == {"miss"}
    second = build_engines(tiny_models["sd1"], tmp_path / "b", cfg, cache=cache)
    assert second["export_cache"] == "hit" and {c["cache"] for c in second["components"].values()} == {"hit"}
    assert first["files"] == second["files"]
    changed = build_engines(tiny_models["sd1"], tmp_path / "c", BuildConfig(precision="int8", accuracy_prompts=0, calibration_steps=3,
                                                                             calibration_prompts=2), cache=cache)
    assert changed["export_cache"] == "hit" and changed["components"]["unet"]["cache"] == "miss"
    assert changed["files"]["unet/model.cpu-optimized.onnx"] != first["files"]["unet/model.cpu-optimized.onnx"]


def test_static_shape_engines(tiny_models, tmp_path):
    out = tmp_path / "static"
    build_engines(tiny_models["sd1"], out, BuildConfig(backend="openvino", static_shape=(24, 16)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["spec"]["inputs"][0]["dims"] == [2, 4, 12, 8]
    assert manifest["accuracy"]["min_image_psnr_db"] >= 40
    assert generate(out, height=24, width=16, steps=4)[0].shape == (24, 16, 3)
    with pytest.raises(SdrtError, match="static shapes for 24x16"):
        generate(out, height=16, width=16, steps=4)


def test_unavailable_precisions_say_so(tiny_models, tmp_path):
    for cfg, message in [(BuildConfig(precision="fp16"), "fp16 .*openvino"), (BuildConfig(precision="int8-weights"), "int8-weights"),
                         (BuildConfig(precision="bf16"), "bf16 .*openvino"),
                         (BuildConfig(static_shape=(16, 16)), "--static-shape is supported by --backend openvino only"),
                         (BuildConfig(backend="openvino", int8_method="dynamic", precision="int8"), "--int8-method dynamic"),
                         (BuildConfig(backend="openvino", device="npu"), "--device 'npu'")]:
        with pytest.raises(SdrtError, match=message):
            build_engines(tiny_models["sd1"], tmp_path / "x", cfg)
    assert not (tmp_path / "x").exists()


def test_int8_of_a_graph_whose_weights_are_hard_linked(tmp_path):
    """Large exports keep weights in model.onnx.data, hard-linked from the export cache; onnx refuses to
    quantize such a file, so the engine folder gets its own copy and the cache's file stays as it was."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.engines.quantize_onnx import quantize_dynamic_int8

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    cache, engine = tmp_path / "cache", tmp_path / "engine"
    cache.mkdir(), engine.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(cache / "model.onnx"),
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (engine / "model.onnx").write_bytes((cache / "model.onnx").read_bytes())
    (engine / "model.onnx.data").hardlink_to(cache / "model.onnx.data")
    cached = (cache / "model.onnx.data").read_bytes()

    out = quantize_dynamic_int8(engine / "model.onnx", ())

    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert (cache / "model.onnx.data").stat().st_nlink == 1 and (cache / "model.onnx.data").read_bytes() == cached
