"""The sigma schedule shared by the Karras-form schedulers (Euler, Euler ancestral, LMS)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Scheduler
from .config import CommonConfig
from .schedule import alphas_cumprod, check_steps, interp_sigmas, karras_sigma_table, karras_sigmas, sigma_to_t, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class SigmaConfig(CommonConfig):
    use_karras_sigmas: bool = False

    UNSUPPORTED = {
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
        "sigma_min": None,
        "sigma_max": None,
    }


def sigma_schedule(cfg: SigmaConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """-> timesteps (n,) float32, sigmas (n + 1,) float32 ending in 0, init_noise_sigma."""
    check_steps(num_steps, cfg)
    timesteps = spaced_timesteps(cfg, num_steps, integer=False)
    table = karras_sigma_table(alphas_cumprod(cfg, terminal_floor=True))
    sigmas = interp_sigmas(timesteps, table)
    if cfg.use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
        timesteps = sigma_to_t(sigmas, np.log(table))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    max_sigma = sigmas.max()
    init = max_sigma if cfg.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + np.float32(1.0)) ** np.float32(0.5)
    return timesteps.astype(np.float32), sigmas, np.float32(init)


def scale_by_sigma(x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The U-Net input x / sqrt(sigma^2 + 1) (Karras et al. 2022, c_in)."""
    return x / ((sigma**2 + np.float32(1.0)) ** np.float32(0.5))


class SigmaScheduler(Scheduler):
    """The Karras form x_t = x0 + sigma_t eps: the U-Net sees x / sqrt(sigma^2 + 1); `config` is a SigmaConfig."""

    sigmas: np.ndarray  # (n + 1,) float32, ending in 0

    def _schedule(self, num_steps: int) -> None:
        self.timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(self.config, num_steps)

    def scale_model_input(self, x, i):
        return scale_by_sigma(x, self.sigmas[i])

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]
