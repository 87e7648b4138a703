"""What every scheduler offers the pipeline. Steps are addressed by index i = begin .. len(timesteps) - 1."""

from __future__ import annotations

import numpy as np

from ..errors import SdrtError


def begin_index(num_steps: int, strength: float) -> int:
    """The first step of a schedule that starts from a noised image (img2img, inpainting, depth), as
    diffusers' pipelines choose it: the last int(num_steps * strength) steps run (float product: 100 x 0.29
    runs 28). Every sdrt scheduler has diffusers' order 1, so the index is the step count skipped."""
    if not 0 < strength <= 1:
        raise SdrtError(f"--strength {strength:g} is out of range: accepted values are 0 < strength <= 1")
    if num_steps < 1:
        return 0  # the schedule's own check names the step count
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise SdrtError(f"--strength {strength:g} with --steps {num_steps} runs no denoising step (int(steps x strength) = 0); "
                        "raise --strength or --steps")
    return num_steps - run


class Scheduler:
    name: str
    timesteps: np.ndarray  # (n,) float32: the values fed to the U-Net's timestep input
    init_noise_sigma: float  # the initial latents are unit noise times this
    needs_noise: bool = False  # step() takes a fresh unit-noise tensor shaped like the sample
    begin: int = 0  # the first step index the loop runs

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        """Precompute the schedule; with strength < 1, the loop starts at `begin` (multistep history starts there)."""
        self.begin = begin_index(num_steps, strength)
        self._schedule(num_steps)

    def _schedule(self, num_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 noised to the level of step i (diffusers' add_noise at timesteps[i])."""
        raise NotImplementedError
