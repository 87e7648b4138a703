"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2 (multistep second order, data prediction), with diffusers'
defaults: first order on the first step and, below 15 steps or with a zero final sigma, the last.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import SdrtError
from .base import Scheduler
from .config import CommonConfig, parse_config
from .parameterization import vp_x0
from .schedule import alphas_cumprod, check_steps, interp_sigmas, karras_sigma_table, karras_sigmas, sigma_to_t


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(CommonConfig):
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"

    UNSUPPORTED = {
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "euler_at_final": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "lambda_min_clipped": float("-inf"),
        "use_dynamic_shifting": False,
    }


class DPMSolverPlusPlus2MScheduler(Scheduler):
    name = "dpmpp_2m"
    init_noise_sigma = 1.0

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(DPMSolverConfig, model_config, **overrides)
        cfg = self.config
        if cfg.solver_order not in (1, 2):
            raise SdrtError(f"scheduler config key 'solver_order' = {cfg.solver_order} is not supported by dpmpp_2m (accepted: 1, 2)")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise SdrtError(f"scheduler config key 'solver_type' = {cfg.solver_type!r} is not supported (accepted: midpoint, heun)")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise SdrtError(f"scheduler config key 'final_sigmas_type' = {cfg.final_sigmas_type!r} is not supported (accepted: zero, sigma_min)")
        self.alphas_cumprod = alphas_cumprod(cfg, terminal_floor=True)
        self._sigma_table = karras_sigma_table(self.alphas_cumprod)  # (T,) ascending in t

    def _spaced(self, num_steps: int) -> np.ndarray:
        # DPM-Solver spaces n + 1 points and drops the last (t = 0)
        cfg, T = self.config, self.config.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ratio = T // (num_steps + 1)
            return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1

    def _timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (n,) timesteps and (n,) sigmas."""
        cfg = self.config
        timesteps = self._spaced(num_steps)
        sigma_table = self._sigma_table
        if cfg.use_karras_sigmas:
            log_table = np.log(sigma_table)
            sigmas = karras_sigmas(float(sigma_table[0]), float(sigma_table[-1]), num_steps)
            timesteps = sigma_to_t(sigmas, log_table)
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interp_sigmas(timesteps, sigma_table)
        return timesteps, sigmas

    def _schedule(self, num_steps: int) -> None:
        check_steps(num_steps, self.config)
        cfg = self.config
        timesteps, sigmas = self._timesteps(num_steps)
        if np.unique(sigmas).size < num_steps:  # a zero step: diffusers divides by it and returns NaN
            most = next(n for n in range(num_steps - 1, 0, -1) if np.unique(self._timesteps(n)[1]).size == n)
            raise SdrtError(f"--steps {num_steps}: dpmpp_2m repeats a noise level at this many steps with this model's "
                            f"{cfg.timestep_spacing} spacing (its image would be NaN, as in diffusers); use at most {most}")
        sigma_last = float(self._sigma_table[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = timesteps.astype(np.int64).astype(np.float32)
        n = len(self.timesteps)

        # Tables in float32, as diffusers computes them: alpha_t = 1 / sqrt(sigma^2 + 1), the VP
        # sigma_t = sigma alpha_t, and the half-log-SNR lambda_t = log alpha_t - log sigma_t.
        self._alpha = (np.float32(1.0) / (sigmas**2 + np.float32(1.0)) ** np.float32(0.5)).astype(np.float32)
        self._sigma = (sigmas * self._alpha).astype(np.float32)
        with np.errstate(divide="ignore"):
            self._lambda = (np.log(self._alpha) - np.log(self._sigma)).astype(np.float32)  # +inf at sigma = 0
        self._first_order = np.zeros(n, dtype=bool)
        self._first_order[self.begin] = True
        if cfg.solver_order == 1:
            self._first_order[:] = True
        if cfg.final_sigmas_type == "zero" or (cfg.lower_order_final and n < 15):
            self._first_order[-1] = True
        self._prev_x0: np.ndarray | None = None

    def step(self, model_output, i, x, noise=None):
        cfg = self.config
        a_s0, s_s0, lam_s0 = self._alpha[i], self._sigma[i], self._lambda[i]
        a_t, s_t, lam_t = self._alpha[i + 1], self._sigma[i + 1], self._lambda[i + 1]
        # data prediction x0 from the model output
        x0 = vp_x0(model_output, x, a_s0, s_s0, cfg.prediction_type)
        h = lam_t - lam_s0
        with np.errstate(over="ignore"):
            phi = np.exp(-h) - np.float32(1.0)  # -1 when sigma_t = 0
        if self._first_order[i]:
            # eq. (5) of DPM-Solver++: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0
            x_next = (s_t / s_s0) * x - (a_t * phi) * x0
        else:
            # Algorithm 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, written as D0 + D1 / 2
            h_0 = lam_s0 - self._lambda[i - 1]
            r0 = h_0 / h
            d0, d1 = x0, (np.float32(1.0) / r0) * (x0 - self._prev_x0)
            if cfg.solver_type == "midpoint":
                x_next = (s_t / s_s0) * x - (a_t * phi) * d0 - np.float32(0.5) * (a_t * phi) * d1
            else:
                x_next = (s_t / s_s0) * x - (a_t * phi) * d0 + (a_t * (phi / h + np.float32(1.0))) * d1
        self._prev_x0 = x0
        return x_next

    def add_noise(self, x0, noise, i):
        # x_t = alpha_t x0 + sigma_t eps (VP form, from the Karras sigma as diffusers converts it)
        return self._alpha[i] * x0 + self._sigma[i] * noise
