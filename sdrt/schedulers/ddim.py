"""DDIM: Song et al. 2020, "Denoising Diffusion Implicit Models", eq. (12), deterministic (eta = 0)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Scheduler
from .config import CommonConfig, parse_config
from .parameterization import vp_eps, vp_x0
from .schedule import alphas_cumprod, check_steps, spaced_timesteps, vp_add_noise


@dataclasses.dataclass(frozen=True)
class DDIMConfig(CommonConfig):
    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    UNSUPPORTED = {"thresholding": False}


class DDIMScheduler(Scheduler):
    name = "ddim"
    init_noise_sigma = 1.0

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(DDIMConfig, model_config, **overrides)
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _schedule(self, num_steps: int) -> None:
        check_steps(num_steps, self.config)
        t = spaced_timesteps(self.config, num_steps, integer=True)
        self.timesteps = t.astype(np.float32)
        # diffusers steps back by T // n whatever the spacing
        prev_t = t - self.config.num_train_timesteps // num_steps
        self._alpha_prod_t = self.alphas_cumprod[t]
        self._alpha_prod_t_prev = np.array(
            [self.alphas_cumprod[p] if p >= 0 else self.final_alpha_cumprod for p in prev_t], dtype=np.float32
        )

    def step(self, model_output, i, x, noise=None):
        cfg = self.config
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prod_t[i], self._alpha_prod_t_prev[i]
        alpha_t, sigma_t = alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5
        # 1. predicted x0 and eps, eq. (9)
        x0 = vp_x0(model_output, x, alpha_t, sigma_t, cfg.prediction_type)
        eps = vp_eps(model_output, x, alpha_t, sigma_t, cfg.prediction_type)
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        # 2. "direction pointing to x_t", eq. (12) with sigma_t = 0
        direction = (1 - alpha_prod_t_prev) ** 0.5 * eps
        # 3. x_{t-1} = sqrt(alpha_{t-1}) x0 + direction, eq. (12)
        return alpha_prod_t_prev**0.5 * x0 + direction

    def add_noise(self, x0, noise, i):
        return vp_add_noise(self.alphas_cumprod, self.timesteps[i], x0, noise)
