"""--guidance-cutoff against diffusers' SDCFGCutoffCallback (classifier-free guidance off after a fraction of
the steps): same model, seed, scheduler and cutoff give the same image. 60 dB as the task parity tests
(tests/test_tasks_parity.py says why 40 dB is too loose on tiny random models)."""

import numpy as np
import pytest

from conftest import picture, psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.callbacks import SDCFGCutoffCallback  # noqa: E402

from sdrt.schedulers import DIFFUSERS_CLASS_OF  # noqa: E402

MIN_PSNR = 60.0
PROMPT, NEGATIVE, SEED = "a lighthouse at dusk", "blurry", 42


def _reference(cls, model, scheduler):
    pipe = cls.from_pretrained(model, safety_checker=None)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(engines, **kwargs):
    return generate(engines, prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, **kwargs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("task,kind,scheduler,steps,cutoff", [
    ("txt2img", "sd1", "dpmpp_2m", 20, 0.4),
    ("txt2img", "sd2", "euler_a", 15, 0.7),  # noise every step, v-prediction
    ("img2img", "sd1", "pndm", 20, 0.5),  # strength 0.6: the fraction is of the 12 steps that run
])
def test_cutoff_matches_diffusers_callback(task, kind, scheduler, steps, cutoff, tiny_models, tiny_engines):
    image = picture(64, 64) if task == "img2img" else None
    cls = diffusers.StableDiffusionImg2ImgPipeline if image else diffusers.StableDiffusionPipeline
    ref = _reference(cls, tiny_models[kind], scheduler)
    extra = {"image": image, "strength": 0.6} if image else {}
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
                   callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=cutoff), output_type="np", **extra).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    task_args = {"init_image": image, "strength": 0.6} if image else {}
    got = _generate(tiny_engines[kind], steps=steps, guidance=7.5, scheduler=scheduler, guidance_cutoff=cutoff, **task_args)
    full = _generate(tiny_engines[kind], steps=steps, guidance=7.5, scheduler=scheduler, **task_args)
    assert expected.std() > 2, "reference image is flat: the comparison would prove nothing"
    assert psnr(got, expected) >= MIN_PSNR, psnr(got, expected)
    assert psnr(got, full) < MIN_PSNR, "the cutoff changed nothing: the comparison would prove nothing"


@pytest.mark.slow
def test_cutoff_one_is_the_full_guidance_image(tiny_engines):
    settings = dict(steps=8, guidance=7.5, scheduler="euler")
    assert np.array_equal(_generate(tiny_engines["sd1"], guidance_cutoff=1.0, **settings), _generate(tiny_engines["sd1"], **settings))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_cutoff_outside_zero_to_one_is_refused(value, tiny_engines, tmp_path, capsys):
    result = in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--guidance-cutoff", value,
                        "--output", tmp_path / "a.png")
    assert_clean_error(result, "--guidance-cutoff", "0 .. 1")
    assert not (tmp_path / "a.png").exists()
