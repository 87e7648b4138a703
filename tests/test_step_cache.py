"""Step caching (DeepCache, Ma et al. 2023): `sdrt build --cache-branch B` exports the U-Net also returning the feature
its shallow pass, `unet_shallow`, starts from; `sdrt generate --cache-interval N` runs the whole U-Net every N steps
and the shallow pass between. References: the single-graph U-Net (the parts reproduce it with a fresh feature) and
DeepCache's own DeepCacheSDHelper on diffusers' pipeline (the same skipped modules, the same schedule)."""

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DeepCache = pytest.importorskip("DeepCache")

from sdrt.components import ComponentSpec  # noqa: E402
from sdrt.engines.base import LoadConfig, engine_class  # noqa: E402
from sdrt.manifest import load_manifest  # noqa: E402

MIN_PSNR = 60.0  # as the task parity tests (tests/test_tasks_parity.py says why 40 dB is too loose on tiny random models)
PROMPT, NEGATIVE, SEED = "a lighthouse at dusk", "blurry", 42


@pytest.fixture(scope="module")
def cached_engines(tiny_models, tmp_path_factory):
    """kind -> onnxruntime fp32 engines built with --cache-branch 0."""
    from sdrt.cli import main

    out, built = tmp_path_factory.mktemp("step-cache"), {}
    for kind in ("sd1", "sd2"):
        assert main(["build", str(tiny_models[kind]), "--cache-branch", "0", "--out", str(out / kind), "--quiet", "--accuracy-prompts", "0"]) == 0
        built[kind] = out / kind
    return built


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_shallow_pass_with_a_fresh_feature_is_the_whole_unet(kind, cached_engines):
    folder = cached_engines[kind]
    manifest = load_manifest(folder, verify=False)
    backend = engine_class("onnxruntime")
    specs = {name: ComponentSpec.from_json(manifest["components"][name]["spec"]) for name in ("unet", "unet_shallow")}
    unet, shallow = (backend.load(folder / name, specs[name], LoadConfig()) for name in ("unet", "unet_shallow"))
    sizes = {"batch": 2, "sequence": 77, "latent_height": 6, "latent_width": 10}
    feeds = specs["unet"].sample_inputs(sizes, np.random.default_rng(0))
    whole = unet.run(feeds)
    again = shallow.run({**feeds, "deep_feature": whole["deep_feature"]})["out_sample"]
    assert np.abs(again - whole["out_sample"]).max() <= 1e-4, np.abs(again - whole["out_sample"]).max()
    stale = shallow.run({**feeds, "deep_feature": whole["deep_feature"] * 0.5})["out_sample"]
    assert np.abs(stale - whole["out_sample"]).max() > 1e-2, "the shallow pass ignores the feature: the check would prove nothing"


def test_interval_one_is_todays_image(cached_engines, tiny_engines):
    settings = dict(steps=6, scheduler="euler", guidance=7.5)
    assert np.array_equal(generate(cached_engines["sd1"], cache_interval=1, **settings)[0], generate(tiny_engines["sd1"], **settings)[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind,scheduler,steps,interval,guidance", [
    ("sd1", "dpmpp_2m", 12, 3, 7.5),
    ("sd1", "euler_a", 10, 2, 1.0),  # no classifier-free guidance, noise every step
    ("sd2", "ddim", 12, 4, 7.5),  # v-prediction
])
def test_cached_image_matches_deepcache(kind, scheduler, steps, interval, guidance, tiny_models, cached_engines):
    from diffusers import StableDiffusionPipeline

    from sdrt.schedulers import DIFFUSERS_CLASS_OF

    ref = StableDiffusionPipeline.from_pretrained(tiny_models[kind], safety_checker=None)
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    helper = DeepCache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    helper.disable()
    expected = (expected * 255).round().astype(np.uint8)
    settings = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance, seed=SEED, scheduler=scheduler)
    got = generate(cached_engines[kind], cache_interval=interval, **settings)[0]
    whole = generate(cached_engines[kind], **settings)[0]
    assert expected.std() > 2, "reference image is flat: the comparison would prove nothing"
    assert psnr(got, expected) >= MIN_PSNR, psnr(got, expected)
    assert psnr(got, whole) < MIN_PSNR, "caching changed nothing: the comparison would prove nothing"
    assert psnr(got, whole) >= 15, psnr(got, whole)  # a tiny random model's cached image stays the same picture


def test_step_cache_works_with_guidance_cutoff_and_low_memory(cached_engines):
    settings = dict(prompt=PROMPT, steps=8, seed=SEED, cache_interval=2, guidance_cutoff=0.5)
    images = [generate(cached_engines["sd1"], {"low_memory": low_memory}, **settings)[0] for low_memory in (False, True)]
    assert np.array_equal(*images)


def test_step_cache_errors_name_the_option(cached_engines, tiny_engines, tiny_models, tmp_path, capsys):
    out = tmp_path / "a.png"
    result = in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--cache-interval", "2", "--output", out)
    assert_clean_error(result, "--cache-interval needs engines built for step caching", "--cache-branch 0")
    result = in_process(capsys, "generate", cached_engines["sd1"], "--prompt", "x", "--steps", "2", "--cache-interval", "0", "--output", out)
    assert_clean_error(result, "--cache-interval 0 is not accepted")
    result = in_process(capsys, "build", tiny_models["sd1"], "--cache-branch", "1", "--out", tmp_path / "E", "--quiet")
    assert_clean_error(result, "--cache-branch 1 is not accepted for this U-Net: 0 .. 0")
    assert not out.exists() and not (tmp_path / "E").exists()


def test_openvino_engines_cache_too(tiny_models, cached_engines, tmp_path, capsys):
    pytest.importorskip("openvino")
    folder = tmp_path / "ov"
    assert in_process(capsys, "build", tiny_models["sd1"], "--backend", "openvino", "--cache-branch", "0", "--out", folder, "--quiet",
                      "--accuracy-prompts", "0").returncode == 0
    settings = dict(steps=8, scheduler="euler", cache_interval=2)
    assert psnr(generate(folder, **settings)[0], generate(cached_engines["sd1"], **settings)[0]) >= 40
    genai = load_manifest(folder, verify=False)["openvino_genai"]
    assert genai["loadable"] is False and "--cache-branch" in genai["why"]
    assert "step cache:  branch 0" in in_process(capsys, "info", folder).stdout


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_calibrates_the_shallow_pass_too(backend, tiny_models, cached_engines, tmp_path, capsys):
    """int8 quantizes the shallow pass's activations from recorded inputs (the feature the previous step kept), as the
    U-Net's: before, it kept float activations (onnxruntime) or 8-bit weights only (openvino)."""
    pytest.importorskip(backend)
    folder = tmp_path / backend
    assert in_process(capsys, "build", tiny_models["sd1"], "--backend", backend, "--precision", "int8", "--cache-branch", "0",
                      "--calibration-prompts", "2", "--calibration-steps", "3", "--accuracy-prompts", "0", "--out", folder,
                      "--quiet").returncode == 0
    stages = load_manifest(folder, verify=False)["build_stages"]
    assert list(stages).index("calibration") == list(stages).index("unet") - 1 and "accuracy" not in stages  # recorded once, for both
    for name in ("unet", "unet_shallow"):
        if backend == "onnxruntime":
            import onnx

            graph = onnx.load(str(folder / name / "model.cpu-optimized.onnx"), load_external_data=False).graph
            ops = {n.op_type for n in graph.node}
            quantized = {"QLinearConv", "QuantizeLinear"} & ops
        else:
            import openvino as ov

            quantized = {op.get_type_name() for op in ov.Core().read_model(str(folder / name / "model.xml")).get_ops()} & {"FakeQuantize"}
        assert quantized, f"{name}: no quantized activations"
    settings = dict(steps=8, scheduler="euler", cache_interval=2)
    assert psnr(generate(folder, **settings)[0], generate(cached_engines["sd1"], **settings)[0]) >= 20
