"""Build options: the accuracy gate, static shapes, the build cache, precisions a backend refuses, int8 of
hard-linked graphs (precision builds themselves: test_precisions.py)."""

import json

import numpy as np
import pytest

from helpers import generate

ov = pytest.importorskip("openvino")
pytest.importorskip("torch")

from sdrt.engines.base import BuildConfig  # noqa: E402
from sdrt.engines.cache import BuildCache  # noqa: E402
from sdrt.errors import SdrtError  # noqa: E402
from sdrt.exporters.build import build_engines  # noqa: E402


def test_bf16_is_refused_where_it_is_not_native(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(ov.Core, "get_property", lambda self, device, name: ["FP32", "INT8"])
    with pytest.raises(SdrtError, match="--precision bf16 needs native bf16 .*FP32, INT8"):
        build_engines(tiny_models["sd1"], tmp_path / "x", BuildConfig(backend="openvino", precision="bf16"))
    assert not (tmp_path / "x").exists()


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
    build_engines(tiny_models["sd1"], out, BuildConfig(backend="openvino", static_shape=(24, 16), accuracy_prompts=1, accuracy_steps=4))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["spec"]["inputs"][0]["dims"] == [2, 4, 12, 8]
    assert manifest["accuracy"]["min_image_psnr_db"] >= 40
    assert not manifest["openvino_genai"]["loadable"] and "static-shape" in manifest["openvino_genai"]["why"]
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
