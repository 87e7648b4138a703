"""PNDM: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

PLMS (linear multistep, eq. (12)) after either three pseudo Runge-Kutta steps (eq. (13); 12 U-Net
calls) or, with `skip_prk_steps` (Stable Diffusion's configs), a pseudo-improved-Euler start.
The transfer function phi is eq. (11).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Scheduler
from .config import CommonConfig, parse_config
from .schedule import alphas_cumprod, check_steps, spaced_timesteps, vp_add_noise


@dataclasses.dataclass(frozen=True)
class PNDMConfig(CommonConfig):
    timestep_spacing: str = "leading"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(Scheduler):
    name = "pndm"
    init_noise_sigma = 1.0
    order = 4

    def __init__(self, model_config: dict, **overrides):
        self.config = parse_config(PNDMConfig, model_config, **overrides)
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _schedule(self, num_steps: int) -> None:
        check_steps(num_steps, self.config)
        cfg = self.config
        ratio = cfg.num_train_timesteps // num_steps
        base = spaced_timesteps(cfg, num_steps, integer=True)[::-1]  # ascending
        if cfg.skip_prk_steps:
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            prk = np.array(base[-self.order :]).repeat(2) + np.tile(np.array([0, ratio // 2]), self.order)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        t = np.concatenate([prk, plms]).astype(np.int64)
        self.timesteps = t.astype(np.float32)
        # per step index: (timestep used for alpha_t, previous timestep, how the model output is combined,
        # steps run before it: diffusers' `counter`, which starts at 0 on the first step run, `begin`)
        self._plan = {}
        for i in range(self.begin, len(t)):
            c, ti = i - self.begin, int(t[i])
            if c < len(prk):
                self._plan[i] = (int(prk[c // 4 * 4]), ti - (0 if c % 2 else ratio // 2), "prk", c)
            elif c == 1:
                self._plan[i] = (ti + ratio, ti, "plms", c)  # the second step re-does the first interval
            else:
                self._plan[i] = (ti, ti - ratio, "plms", c)
        self._ets: list[np.ndarray] = []
        self._cur_model_output = 0.0
        self._cur_sample: np.ndarray | None = None

    def _phi(self, x, t, prev_t, eps):
        """eq. (11): x_{t-delta} from x_t and eps."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            eps = a_t**0.5 * eps + b_t**0.5 * x
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * x - (a_prev - a_t) * eps / denom

    def step(self, model_output, i, x, noise=None):
        t, prev_t, kind, c = self._plan[i]
        if kind == "prk":
            return self._step_prk(model_output, c, x, t, prev_t)
        return self._step_plms(model_output, c, x, t, prev_t)

    def _step_prk(self, e, c, x, t, prev_t):
        # eq. (13): e1/6 + e2/3 + e3/3 + e4/6 over two half steps
        stage = c % 4
        if stage == 0:
            self._cur_model_output = e / 6
            self._ets.append(e)
            self._cur_sample = x
        elif stage in (1, 2):
            self._cur_model_output = self._cur_model_output + e / 3
        else:
            e = self._cur_model_output + e / 6
            self._cur_model_output = 0.0
        return self._phi(self._cur_sample, t, prev_t, e)

    def _step_plms(self, e, c, x, t, prev_t):
        # eq. (12) with up to four previous eps; without PRK steps, the first two steps run form a Heun start
        if c != 1:
            self._ets = self._ets[-3:] + [e]
        ets = self._ets
        if len(ets) == 1 and c == 0:
            self._cur_sample = x
        elif len(ets) == 1 and c == 1:
            e = (e + ets[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._phi(x, t, prev_t, e)

    def add_noise(self, x0, noise, i):
        return vp_add_noise(self.alphas_cumprod, self.timesteps[i], x0, noise)
