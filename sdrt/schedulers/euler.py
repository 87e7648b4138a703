"""Euler: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 2 without churn (s_churn = 0): one Euler step of the probability-flow ODE per sigma."""

from __future__ import annotations

import dataclasses

from .config import parse_config
from .parameterization import ve_x0
from .sigma_schedule import SigmaConfig, SigmaScheduler


@dataclasses.dataclass(frozen=True)
class EulerConfig(SigmaConfig):
    pass


class EulerScheduler(SigmaScheduler):
    name = "euler"

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(EulerConfig, model_config, **overrides)

    def step(self, model_output, i, x, noise=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = ve_x0(model_output, x, sigma, self.config.prediction_type)
        # d = (x - x0) / sigma, the ODE derivative dx/dsigma (Algorithm 2, line 5)
        derivative = (x - x0) / sigma
        # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d (line 6)
        return x + derivative * (sigma_next - sigma)
