"""What every scheduler offers the pipeline. Steps are addressed by index i = 0 .. n-1."""

from __future__ import annotations

import numpy as np


class Scheduler:
    name: str
    timesteps: np.ndarray  # (n,) float32: the values fed to the U-Net's timestep input
    init_noise_sigma: float  # the initial latents are unit noise times this
    needs_noise: bool = False  # step() takes a fresh unit-noise tensor shaped like the sample

    def set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError
