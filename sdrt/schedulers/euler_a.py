"""Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up, so that
sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's `sample_euler_ancestral`, eta = 1)."""

from __future__ import annotations

import dataclasses

from .config import parse_config
from .parameterization import ve_x0
from .sigma_schedule import SigmaConfig, SigmaScheduler


@dataclasses.dataclass(frozen=True)
class EulerAncestralConfig(SigmaConfig):
    UNSUPPORTED = {**SigmaConfig.UNSUPPORTED, "use_karras_sigmas": False}


class EulerAncestralScheduler(SigmaScheduler):
    name = "euler_a"
    needs_noise = True

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(EulerAncestralConfig, model_config, **overrides)

    def step(self, model_output, i, x, noise=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = ve_x0(model_output, x, sigma, self.config.prediction_type)
        # 1. split the step: sigma_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2), sigma_down = sqrt(s_next^2 - sigma_up^2)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        # 2. deterministic Euler step to sigma_down
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        # 3. add the ancestral noise
        return x + noise * sigma_up
