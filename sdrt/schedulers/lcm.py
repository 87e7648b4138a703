"""LCM: Luo et al. 2023, "Latent Consistency Models", multistep consistency sampling (Algorithm 3):
each step maps x_t to the trajectory's origin with the consistency function f(x, t) = c_skip x + c_out x0
(boundary-condition scalings of the timestep times `timestep_scaling`), then, except at the last step,
noises that estimate again to the next timestep. Timesteps are evenly spaced indices into the
distillation schedule of `original_inference_steps` steps; img2img shortens that schedule by
`strength` and runs all steps, as diffusers' LCM pipelines do."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Scheduler
from .config import CommonConfig, parse_config
from .parameterization import vp_x0
from .schedule import alphas_cumprod, distillation_timesteps, vp_add_noise

SIGMA_DATA = 0.5  # the boundary condition's data standard deviation


@dataclasses.dataclass(frozen=True)
class LCMConfig(CommonConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0
    timestep_spacing: str = "leading"  # not used by LCM's own spacing

    UNSUPPORTED = {"thresholding": False}


class LCMScheduler(Scheduler):
    name = "lcm"
    init_noise_sigma = 1.0
    needs_noise = True  # drawn for every step but the last

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(LCMConfig, model_config, **overrides)
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        cfg = self.config
        t = distillation_timesteps(cfg, cfg.original_inference_steps, num_steps, strength, self.name)
        self.begin = 0
        self.timesteps = t.astype(np.float32)
        self._alpha_prod_t = self.alphas_cumprod[t]
        prev = np.append(t[1:], t[-1])  # the last step's "next" timestep is its own (unused: no noise there)
        self._alpha_prod_t_prev = np.array([self.alphas_cumprod[p] if p >= 0 else self.final_alpha_cumprod for p in prev], dtype=np.float32)
        scaled, sd2 = t.astype(np.float64) * cfg.timestep_scaling, SIGMA_DATA**2
        self._c_skip = (sd2 / (scaled**2 + sd2)).astype(np.float32)
        self._c_out = (scaled / (scaled**2 + sd2) ** 0.5).astype(np.float32)

    def step(self, model_output, i, x, noise=None):
        cfg = self.config
        alpha_prod_t = self._alpha_prod_t[i]
        # 1. the clean-sample estimate, then the consistency function f(x, t) = c_skip x + c_out x0
        x0 = vp_x0(model_output, x, alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5, cfg.prediction_type)
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        denoised = self._c_out[i] * x0 + self._c_skip[i] * x
        if i == len(self.timesteps) - 1:
            return denoised
        # 2. noised again to the next timestep
        alpha_prev = self._alpha_prod_t_prev[i]
        return alpha_prev**0.5 * denoised + (1 - alpha_prev) ** 0.5 * noise

    def add_noise(self, x0, noise, i):
        return vp_add_noise(self.alphas_cumprod, self.timesteps[i], x0, noise)
