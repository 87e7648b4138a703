"""TCD: Zheng et al. 2024, "Trajectory Consistency Distillation", strategic stochastic sampling: from x_t the
model's x0 and eps give the trajectory's point at s = floor((1 - gamma) t_next) (DDIM to s), which is then noised
forward to t_next (fresh noise, except at the last step). gamma = 0 is deterministic; sdrt uses 0.3, the paper's
and diffusers' default. Timesteps as LCM's: evenly spaced indices into the distillation schedule."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Scheduler
from .config import CommonConfig, parse_config
from .parameterization import vp_eps, vp_x0
from .schedule import alphas_cumprod, distillation_timesteps, vp_add_noise

GAMMA = 0.3


@dataclasses.dataclass(frozen=True)
class TCDConfig(CommonConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"  # not used by its own spacing

    UNSUPPORTED = {"thresholding": False}  # clip_sample is in diffusers' config but its step never clips


class TCDScheduler(Scheduler):
    name = "tcd"
    init_noise_sigma = 1.0
    needs_noise = True  # drawn for every step but the last

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(TCDConfig, model_config, **overrides)
        self.alphas_cumprod = alphas_cumprod(self.config)

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        t = distillation_timesteps(self.config, self.config.original_inference_steps, num_steps, strength, self.name)
        self.begin = 0
        self.timesteps = t.astype(np.float32)
        t_next = np.append(t[1:], 0)
        s = np.floor((1 - GAMMA) * t_next).astype(np.int64)
        self._alpha_t, self._alpha_next, self._alpha_s = self.alphas_cumprod[t], self.alphas_cumprod[t_next], self.alphas_cumprod[s]

    def step(self, model_output, i, x, noise=None):
        a_t, a_s, pred = self._alpha_t[i], self._alpha_s[i], self.config.prediction_type
        alpha_t, sigma_t = a_t**0.5, (1 - a_t) ** 0.5
        # 1. the trajectory's point at s from the model's x0 and eps (a DDIM step to s)
        x_s = a_s**0.5 * vp_x0(model_output, x, alpha_t, sigma_t, pred) + (1 - a_s) ** 0.5 * vp_eps(model_output, x, alpha_t, sigma_t, pred)
        if i == len(self.timesteps) - 1:
            return x_s
        # 2. forward to the next timestep with fresh noise
        ratio = self._alpha_next[i] / a_s
        return ratio**0.5 * x_s + (1 - ratio) ** 0.5 * noise

    def add_noise(self, x0, noise, i):
        return vp_add_noise(self.alphas_cumprod, self.timesteps[i], x0, noise)
