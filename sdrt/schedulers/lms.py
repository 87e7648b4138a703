"""LMS: Karras-form linear multistep of order up to 4 (k-diffusion's `sample_lms`). The weight of
each past derivative is the integral of its Lagrange basis polynomial over [sigma_i, sigma_{i+1}],
computed exactly here (diffusers integrates the same polynomial numerically)."""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.polynomial import polynomial as P

from .config import parse_config
from .parameterization import ve_x0
from .sigma_schedule import SigmaConfig, SigmaScheduler


@dataclasses.dataclass(frozen=True)
class LMSConfig(SigmaConfig):
    UNSUPPORTED = {**SigmaConfig.UNSUPPORTED, "rescale_betas_zero_snr": False}  # diffusers' LMS has no such option


class LMSScheduler(SigmaScheduler):
    name = "lms"
    max_order = 4

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(LMSConfig, model_config, **overrides)

    def _schedule(self, num_steps: int) -> None:
        super()._schedule(num_steps)
        self._coeffs = [self._lms_coefficients(i) for i in range(num_steps)]
        self._derivatives: list[np.ndarray] = []

    def _lms_coefficients(self, i: int) -> list[float]:
        """Weights for derivatives d_i, d_{i-1}, ...: int_{sigma_i}^{sigma_{i+1}} l_k(tau) dtau."""
        order = min(i + 1, self.max_order)
        s = self.sigmas.astype(np.float64)
        coeffs = []
        for k in range(order):
            basis = np.array([1.0])
            for j in range(order):
                if j != k:
                    basis = P.polymul(basis, np.array([-s[i - j], 1.0]) / (s[i - k] - s[i - j]))
            antiderivative = P.polyint(basis)
            coeffs.append(float(P.polyval(s[i + 1], antiderivative) - P.polyval(s[i], antiderivative)))
        return coeffs

    def step(self, model_output, i, x, noise=None):
        sigma = self.sigmas[i]
        x0 = ve_x0(model_output, x, sigma, self.config.prediction_type)
        self._derivatives = (self._derivatives + [(x - x0) / sigma])[-self.max_order :]
        update = sum(c * d for c, d in zip(self._coeffs[i], reversed(self._derivatives)))
        return x + update
