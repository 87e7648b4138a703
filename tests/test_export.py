"""Each exported component, run by its sdrt engine, against the PyTorch module on the same inputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdrt.components import ComponentSpec  # noqa: E402
from sdrt.engines.base import BuildConfig, LoadConfig  # noqa: E402
from sdrt.engines.cache import BuildCache  # noqa: E402
from sdrt.engines.onnxruntime import OnnxRuntimeEngine, optimized_name  # noqa: E402
from sdrt.exporters import onnx_export  # noqa: E402
from sdrt.exporters.build import build_engines  # noqa: E402
from sdrt.manifest import load_manifest  # noqa: E402
from sdrt.model_info import read_model_info  # noqa: E402

TOLERANCE = 1e-4
SIZES = [
    {"batch": 2, "sequence": 77, "latent_height": 8, "latent_width": 8, "height": 16, "width": 16, "vocab": 49408},
    {"batch": 1, "sequence": 77, "latent_height": 7, "latent_width": 12, "height": 24, "width": 40, "vocab": 49408},
]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_engines_match_torch_modules(kind, tiny_models, tiny_engines):
    modules = onnx_export.load_modules(tiny_models[kind])
    manifest = load_manifest(tiny_engines[kind])
    for name, module in modules.items():
        spec = ComponentSpec.from_json(manifest["components"][name]["spec"])
        assert manifest["components"][name]["export_max_abs_error"] < TOLERANCE
        engine = OnnxRuntimeEngine.load(tiny_engines[kind] / name, spec, LoadConfig())
        for k, sizes in enumerate(SIZES):
            feeds = spec.sample_inputs(sizes, np.random.default_rng(k))
            got = engine.run(feeds)[spec.outputs[0].name]
            with torch.no_grad():
                expected = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
            assert got.shape == expected.shape, (name, sizes)
            assert np.abs(got - expected).max() <= TOLERANCE, (name, sizes)
        engine.close()


def test_large_models_use_external_data(tiny_models, tmp_path, monkeypatch):
    """Above protobuf's 2 GB limit weights go to model.onnx.data; forced here by lowering the limit."""
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    out = tmp_path / "engines"
    manifest = build_engines(tiny_models["sd1"], out, BuildConfig(), cache=BuildCache(None, enabled=False))
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (out / name / "model.onnx.data").is_file()
        assert (out / name / (optimized_name("cpu") + ".data")).is_file()
        assert f"{name}/model.onnx.data" in manifest["files"]
    info = read_model_info(tiny_models["sd1"])
    spec = ComponentSpec.from_json(manifest["components"]["unet"]["spec"])
    engine = OnnxRuntimeEngine.load(out / "unet", spec, LoadConfig())
    feeds = spec.sample_inputs(onnx_export.check_sizes(info), np.random.default_rng(0))
    with torch.no_grad():
        expected = onnx_export.load_modules(tiny_models["sd1"])["unet"](*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
    assert np.abs(engine.run(feeds)["out_sample"] - expected).max() <= TOLERANCE


def test_engine_rejects_wrong_inputs(tiny_engines):
    from sdrt.errors import SdrtError

    manifest = load_manifest(tiny_engines["sd1"])
    spec = ComponentSpec.from_json(manifest["components"]["unet"]["spec"])
    engine = OnnxRuntimeEngine.load(tiny_engines["sd1"] / "unet", spec, LoadConfig())
    feeds = spec.sample_inputs(SIZES[0], np.random.default_rng(0))
    with pytest.raises(SdrtError, match="'timestep' is missing"):
        engine.run({k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(SdrtError, match="'sample' is float64"):
        engine.run({**feeds, "sample": feeds["sample"].astype(np.float64)})
    with pytest.raises(SdrtError, match="'sample' has shape"):
        engine.run({**feeds, "sample": feeds["sample"][:, :3]})
