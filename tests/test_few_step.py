"""Few-step models: an LCM-distilled U-Net (guidance as the timestep_cond embedding, the lcm scheduler) against
diffusers' LCM pipelines; the lcm scheduler on an ordinary model (how LCM-LoRA runs) against diffusers'
StableDiffusionPipeline with LCMScheduler; an SD-Turbo-style schedule (Euler, trailing spacing, 1-4 steps,
no guidance) end to end."""

import json
import shutil

import numpy as np
import pytest

from conftest import _built, _models, picture, psnr
from helpers import generate

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

MIN_PSNR = 60.0  # fp32 engines against diffusers (see test_tasks_parity)
PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory):
    models = _models(tmp_path_factory, ("sd1-lcm",))
    return models["sd1-lcm"], _built(tmp_path_factory, models)["sd1-lcm"]


def _as_uint8(images):
    return [(image * 255).round().astype(np.uint8) for image in images]


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance,num_images", [(4, 8.5, 1), (1, 3.0, 1), (2, 8.5, 2)])
def test_lcm_model_matches_diffusers(steps, guidance, num_images, tiny_lcm):
    model, engines = tiny_lcm
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(model, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    expected = _as_uint8(ref(PROMPT, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num_images,
                             generator=torch.Generator().manual_seed(3), output_type="np").images)
    got = generate(engines, steps=steps, guidance=guidance, num_images=num_images)
    assert len(got) == num_images
    for ours, theirs in zip(got, expected):
        assert theirs.std() > 2
        assert psnr(ours, theirs) >= MIN_PSNR
    other = generate(engines, steps=steps, guidance=guidance + 4, num_images=num_images)[0]
    assert psnr(other, got[0]) < 50, "the guidance embedding changed nothing: the U-Net does not see it"


@pytest.mark.slow
def test_lcm_img2img_matches_diffusers(tiny_lcm):
    model, engines = tiny_lcm
    image = picture(32, 32)
    ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(model, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    expected = _as_uint8(ref(PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=8.5,
                             generator=torch.Generator().manual_seed(3), output_type="np").images)[0]
    got = generate(engines, steps=4, guidance=8.5, init_image=image, strength=0.6)[0]
    assert psnr(got, expected) >= MIN_PSNR


@pytest.mark.slow
@pytest.mark.parametrize("scheduler,guidance", [("lcm", 1.0), ("lcm", 2.0), ("tcd", 1.0)])
def test_consistency_schedulers_on_an_ordinary_model_match_diffusers(scheduler, guidance, tiny_models, tiny_engines):
    """How LCM-LoRA and TCD-LoRA run once merged (sdrt build --lora): the standard loop, with or without
    classifier-free guidance; TCD at gamma (diffusers' eta) 0.3."""
    from sdrt.schedulers import DIFFUSERS_CLASS_OF

    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None)
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = _as_uint8(ref(PROMPT, num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                             output_type="np", **({"eta": 0.3} if scheduler == "tcd" else {})).images)[0]
    got = generate(tiny_engines["sd1"], steps=4, guidance=guidance, scheduler=scheduler)[0]
    assert psnr(got, expected) >= MIN_PSNR


@pytest.mark.slow
def test_turbo_style_schedule_end_to_end(tiny_models, tmp_path):
    """SD-Turbo's scheduler config: Euler with trailing spacing, run at 1-4 steps without guidance."""
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    model = shutil.copytree(tiny_models["sd2"], tmp_path / "turbo")
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    turbo = {**config, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "prediction_type": "epsilon"}
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(turbo))
    build_engines(model, tmp_path / "E", BuildConfig(backend="onnxruntime", accuracy_prompts=0))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    for steps in (1, 4):
        expected = _as_uint8(ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
                                 output_type="np").images)[0]
        got = generate(tmp_path / "E", steps=steps, guidance=0.0)[0]
        assert psnr(got, expected) >= MIN_PSNR, steps
