"""Element-wise parity of every NumPy scheduler with the matching diffusers scheduler."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.errors import SdrtError  # noqa: E402
from sdrt.schedulers import CONSISTENCY, DIFFUSERS_CLASS_OF, SCHEDULERS, default_scheduler_name, make_scheduler  # noqa: E402

TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|, per step


def sd_config(prediction_type, spacing, offset, **extra):
    """A Stable Diffusion style scheduler_config.json (SD 1.5 / 2.1 values)."""
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": offset,
        "timestep_spacing": spacing,
        "prediction_type": prediction_type,
        "trained_betas": None,
        **extra,
    }


def rel_err(ours, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def run_parity(name, config, steps, karras=False, tolerance=TOLERANCE, strength=1.0):
    """Step by step against diffusers. With strength < 1, as diffusers' img2img and inpainting pipelines
    drive a scheduler: the schedule's tail from begin index t_start, the image latents noised to its first
    step by add_noise, and (inpainting's 4-channel blend) add_noise to the next step after every step."""
    ref = getattr(diffusers, DIFFUSERS_CLASS_OF[name]).from_config({**config, **({"use_karras_sigmas": True} if karras else {})})
    ref.set_timesteps(steps)
    ours = make_scheduler(name, config, karras_sigmas=karras)
    ours.set_timesteps(steps, strength)
    assert len(ours.timesteps) == len(ref.timesteps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=1e-6)
    assert rel_err(ours.init_noise_sigma, float(ref.init_noise_sigma)) <= tolerance

    outputs = torch.Generator().manual_seed(1)
    ref_noise = torch.Generator().manual_seed(2)
    our_noise = torch.Generator().manual_seed(2)
    x_ref = torch.randn((1, 4, 8, 8), generator=outputs) * ref.init_noise_sigma
    timesteps = ref.timesteps
    if strength < 1:
        t_start = steps - min(int(steps * strength), steps)
        assert ours.begin == t_start * ref.order
        timesteps = ref.timesteps[t_start * ref.order :]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * ref.order)
        image_latents, start_noise = torch.randn((1, 4, 8, 8), generator=outputs), torch.randn((1, 4, 8, 8), generator=outputs)
        x_ref = ref.add_noise(image_latents, start_noise, timesteps[:1])
        assert rel_err(ours.add_noise(image_latents.numpy(), start_noise.numpy(), ours.begin), x_ref.numpy()) <= tolerance
    x_ours = x_ref.numpy().copy()
    for i, t in enumerate(timesteps, start=ours.begin):
        scaled_ref = ref.scale_model_input(x_ref, t)
        scaled_ours = ours.scale_model_input(x_ours, i)
        assert rel_err(scaled_ours, scaled_ref.numpy()) <= tolerance, (name, steps, i, "scale_model_input")
        model_output = torch.randn((1, 4, 8, 8), generator=outputs)
        kwargs = {"generator": ref_noise} if ours.needs_noise else {}
        x_ref = ref.step(model_output, t, x_ref, **kwargs).prev_sample
        noise = torch.randn((1, 4, 8, 8), generator=our_noise).numpy() if ours.needs_noise else None
        x_ours = ours.step(model_output.numpy(), i, x_ours, noise)
        assert x_ours.dtype == np.float32
        err = rel_err(x_ours, x_ref.numpy())
        assert err <= tolerance, (name, steps, i, err)
        if strength < 1 and i + 1 < len(ours.timesteps):
            blend_ref = ref.add_noise(image_latents, start_noise, torch.tensor([ref.timesteps[i + 1]]))
            assert rel_err(ours.add_noise(image_latents.numpy(), start_noise.numpy(), i + 1), blend_ref.numpy()) <= tolerance, (name, i)
        # continue from the reference so that errors do not compound across steps
        x_ours = x_ref.numpy().copy()


DIFFUSION = sorted(set(SCHEDULERS) - set(CONSISTENCY))  # the consistency samplers have their own spacing: tested below
GRID = list(
    itertools.product(
        DIFFUSION, ["epsilon", "v_prediction"], [1, 2, 10, 20, 50], ["leading", "trailing", "linspace"], [0, 1]
    )
)


@pytest.mark.parametrize("name,prediction_type,steps,spacing,offset", GRID)
def test_parity_with_diffusers(name, prediction_type, steps, spacing, offset):
    run_parity(name, sd_config(prediction_type, spacing, offset), steps)


@pytest.mark.parametrize(
    "name,prediction_type,steps,spacing", itertools.product(["dpmpp_2m", "euler", "lms"], ["epsilon", "v_prediction"], [2, 10, 20, 50], ["leading", "linspace"])
)
def test_karras_sigmas_parity(name, prediction_type, steps, spacing):
    run_parity(name, sd_config(prediction_type, spacing, 1), steps, karras=True)


@pytest.mark.parametrize("name,strength,steps,spacing", itertools.product(DIFFUSION, [0.29, 0.5, 0.75, 1.0], [7, 20, 100], ["leading", "trailing"]))
def test_partial_schedules_and_add_noise_parity(name, strength, steps, spacing):
    run_parity(name, sd_config("epsilon", spacing, 1), steps, strength=strength)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "lms"])
def test_partial_karras_schedule_parity(name):
    run_parity(name, sd_config("v_prediction", "leading", 1), 20, karras=True, strength=0.6)


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_partial_pndm_with_runge_kutta_warmup(strength):
    run_parity("pndm", sd_config("epsilon", "leading", 1, skip_prk_steps=False), 20, strength=strength)


def test_strength_errors_name_the_option():
    scheduler = make_scheduler("ddim", sd_config("epsilon", "leading", 1))
    for strength in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(SdrtError, match="--strength .* accepted values are 0 < strength <= 1"):
            scheduler.set_timesteps(20, strength)
    with pytest.raises(SdrtError, match="--strength 0.04 with --steps 20 runs no denoising step"):
        scheduler.set_timesteps(20, 0.04)
    scheduler.set_timesteps(100, 0.29)
    assert len(scheduler.timesteps) - scheduler.begin == 28  # int(100 * 0.29) in floating point, as diffusers counts


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_with_runge_kutta_warmup(steps, prediction_type):
    run_parity("pndm", sd_config(prediction_type, "leading", 1, skip_prk_steps=False), steps)


@pytest.mark.parametrize("extra", [{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {"beta_schedule": "squaredcos_cap_v2"}, {"set_alpha_to_one": True}, {"clip_sample": True}])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_other_schedule_settings(name, extra):
    run_parity(name, sd_config("epsilon", "leading", 1, **extra), 20)


def test_dpm_settings():
    for extra in ({"solver_type": "heun"}, {"final_sigmas_type": "sigma_min"}, {"lower_order_final": False}, {"solver_order": 1}):
        run_parity("dpmpp_2m", sd_config("epsilon", "linspace", 0, **extra), 20)
        run_parity("dpmpp_2m", sd_config("v_prediction", "trailing", 0, **extra), 10)


def test_unsupported_config_value_names_the_key():
    with pytest.raises(SdrtError, match="'thresholding'"):
        make_scheduler("ddim", sd_config("epsilon", "leading", 1, thresholding=True))
    with pytest.raises(SdrtError, match="'algorithm_type'"):
        make_scheduler("dpmpp_2m", sd_config("epsilon", "leading", 1, algorithm_type="sde-dpmsolver++"))
    with pytest.raises(SdrtError, match="'timestep_spacing' = 'sideways'"):
        make_scheduler("euler", sd_config("epsilon", "sideways", 1))
    with pytest.raises(SdrtError, match="'prediction_type'"):
        make_scheduler("pndm", sd_config("sample", "leading", 1))


def test_unknown_scheduler_and_step_count_errors():
    with pytest.raises(SdrtError, match="--scheduler 'heun'.*accepted values are"):
        make_scheduler("heun", sd_config("epsilon", "leading", 1))
    with pytest.raises(SdrtError, match="--steps 0"):
        make_scheduler("ddim", sd_config("epsilon", "leading", 1)).set_timesteps(0)
    with pytest.raises(SdrtError, match="--karras"):
        make_scheduler("ddim", sd_config("epsilon", "leading", 1), karras_sigmas=True)


def test_default_scheduler_follows_the_model():
    assert default_scheduler_name({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert default_scheduler_name({"_class_name": "UniPCMultistepScheduler"}) == "dpmpp_2m"


ZERO_SNR = ["ddim", "dpmpp_2m", "euler", "euler_a"]  # the diffusers classes with rescale_betas_zero_snr


@pytest.mark.parametrize("name,steps", itertools.product(ZERO_SNR, [1, 10, 20]))
def test_zero_terminal_snr_parity(name, steps):
    """v-prediction with trailing spacing, as Lin et al. 2023 pair it with the rescaled betas.

    Looser tolerance: torch's float32 sqrt is not correctly rounded (1 ulp off in 182 of 1000 entries
    of sqrt(alpha_bar) here), and the rescaling's shift and ratios amplify that to 4e-6 in alpha_bar,
    which the first step from sigma 4096 turns into ~2e-5 of the output. sdrt's sqrt is IEEE."""
    run_parity(name, sd_config("v_prediction", "trailing", 0, rescale_betas_zero_snr=True), steps, tolerance=5e-5)


def test_zero_terminal_snr_schedule():
    ours = make_scheduler("ddim", sd_config("v_prediction", "trailing", 0, rescale_betas_zero_snr=True))
    assert ours.alphas_cumprod[-1] == 0 and ours.alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-6)
    euler = make_scheduler("euler", sd_config("v_prediction", "trailing", 0, rescale_betas_zero_snr=True))
    euler.set_timesteps(10)
    assert euler.init_noise_sigma == pytest.approx(4096, rel=1e-3)  # alpha_bar_T floored at 2**-24


@pytest.mark.parametrize("name", ["lms", "pndm"])
def test_zero_terminal_snr_refused_where_diffusers_has_no_such_option(name):
    with pytest.raises(SdrtError, match="'rescale_betas_zero_snr' = True is not supported"):
        make_scheduler(name, sd_config("v_prediction", "trailing", 0, rescale_betas_zero_snr=True))


def lcm_config(prediction_type="epsilon", **extra):
    """An LCM model's scheduler_config.json (LCM_Dreamshaper_v7 values)."""
    return {**sd_config(prediction_type, "leading", 1), "_class_name": "LCMScheduler", "set_alpha_to_one": True,
            "original_inference_steps": 50, "timestep_scaling": 10.0, **extra}


@pytest.mark.parametrize("name", CONSISTENCY)
@pytest.mark.parametrize("steps,prediction_type,extra", [
    (1, "epsilon", {}), (2, "epsilon", {}), (4, "epsilon", {}), (8, "v_prediction", {}), (50, "epsilon", {}),
    (4, "epsilon", {"original_inference_steps": 100, "set_alpha_to_one": False}), (3, "epsilon", {"timestep_scaling": 5.0}),
    (6, "v_prediction", {"rescale_betas_zero_snr": True}),
])
def test_consistency_sampler_parity_with_diffusers(name, steps, prediction_type, extra):
    """TCD at gamma 0.3, its step's default (the one sdrt uses)."""
    run_parity(name, {**lcm_config(prediction_type, **extra), "_class_name": DIFFUSERS_CLASS_OF[name]}, steps)


@pytest.mark.parametrize("name", CONSISTENCY)
@pytest.mark.parametrize("steps,strength", [(4, 0.5), (2, 0.3), (6, 0.8)])
def test_consistency_img2img_schedule_is_shortened_by_strength(name, steps, strength):
    """diffusers' LCM img2img pipeline: strength shortens the distillation schedule, and every step of the
    shortened schedule runs; the image latents are noised to its first timestep."""
    ref = getattr(diffusers, DIFFUSERS_CLASS_OF[name]).from_config(lcm_config())
    ref.set_timesteps(steps, strength=strength)
    ours = make_scheduler(name, lcm_config())
    ours.set_timesteps(steps, strength)
    assert ours.begin == 0
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    x0, noise = torch.randn((1, 4, 8, 8)), torch.randn((1, 4, 8, 8))
    assert rel_err(ours.add_noise(x0.numpy(), noise.numpy(), 0), ref.add_noise(x0, noise, ref.timesteps[:1]).numpy()) <= TOLERANCE


def test_lcm_step_count_errors_name_the_range():
    with pytest.raises(SdrtError, match="--steps 51 is out of range for the lcm scheduler: accepted values are 1 .. 50"):
        make_scheduler("lcm", lcm_config()).set_timesteps(51)
    with pytest.raises(SdrtError, match=r"1 \.\. 10 .*--strength 0.2"):
        make_scheduler("lcm", lcm_config()).set_timesteps(12, 0.2)
