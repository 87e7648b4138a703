"""What a task hands the shared denoising loop (sdrt/pipeline.py), and the pieces tasks share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..noise import PerImageNoise

if TYPE_CHECKING:
    from ..model_info import ModelInfo
    from ..pipeline import GenerateRequest, Settings, StableDiffusion
    from ..schedulers.base import Scheduler


@dataclasses.dataclass
class Start:
    latents: np.ndarray  # (n, C, h, w) float32: where the loop starts, at step scheduler.begin
    unet_extra: np.ndarray | None = None  # (n, c, h, w) float32: channels after the scaled latents at every step
    unet_feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # further U-Net inputs, (n, ...) each
    unconditional_feeds: dict[str, np.ndarray] | None = None  # what the unconditional half gets instead (None: the same)
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None  # (latents after step i, i) -> latents


class Task:
    name: str
    takes: tuple[str, ...] = ()  # GenerateRequest fields of this task beyond the prompt and sampling settings
    default_strength: float | None = None  # None: the task has no strength
    default_tile: int | None = None  # latent tile side when the request gives none (None: untiled)

    def default_size(self, req: "GenerateRequest", factor: int) -> tuple[int, int] | None:
        """(height, width) when the request gives none; None: the model's size."""
        return None

    def check(self, req: "GenerateRequest", s: "Settings", info: "ModelInfo") -> None:
        """Refuse inputs that cannot make the asked image, naming the option."""

    def start(self, pipe: "StableDiffusion", req: "GenerateRequest", s: "Settings", scheduler: "Scheduler", noise) -> Start:
        raise NotImplementedError


def latent_shape(pipe: "StableDiffusion", s: "Settings", n: int) -> tuple[int, int, int, int]:
    f = pipe.info.vae_scale_factor
    return n, pipe.info.vae_latent_channels, s.height // f, s.width // f


def encode(pipe: "StableDiffusion", pixels: np.ndarray, noise, n: int) -> np.ndarray:
    """pixels (1, 3, H, W) in [-1, 1] -> (n, C, h, w) float32: a sample of the VAE's posterior times the
    scaling factor (diffusers' `latent_dist.sample(generator)`). Shared noise draws one sample for the
    batch and repeats it, as diffusers does with one generator; per-image noise draws image i's sample
    from image i's generator, as diffusers does with a list of generators."""
    params = pipe.engine("vae_encoder").run({"sample": pixels})["latent_parameters"]  # (1, 2C, h, w)
    mean, logvar = np.split(params, 2, axis=1)
    std = np.exp(np.float32(0.5) * np.clip(logvar, np.float32(-30.0), np.float32(20.0)))
    draws = noise.randn((n if isinstance(noise, PerImageNoise) else 1, *mean.shape[1:]))
    latents = (mean + std * draws) * np.float32(pipe.info.scaling_factor)
    return np.ascontiguousarray(np.broadcast_to(latents, (n, *mean.shape[1:])))


def _sin_cos(values: np.ndarray, frequencies: np.ndarray, dim: int, cos_first: bool) -> np.ndarray:
    angles = values.astype(np.float32)[:, None] * frequencies[None, :]
    parts = [np.cos(angles), np.sin(angles)] if cos_first else [np.sin(angles), np.cos(angles)]
    return np.pad(np.concatenate(parts, axis=1), ((0, 0), (0, dim % 2))).astype(np.float32)


def sinusoidal_embedding(values: np.ndarray, dim: int, cos_first: bool, shift: int) -> np.ndarray:
    """(k,) -> (k, dim) float32: diffusers' get_timestep_embedding (flip_sin_to_cos = cos_first, downscale_freq_shift
    = shift), in its order of float32 operations: frequencies exp(-ln(10000) i / (dim / 2 - shift)), i < dim / 2."""
    half = dim // 2
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
    return _sin_cos(values, np.exp(exponent), dim, cos_first)


def guidance_embedding(guidance: float, dim: int, n: int) -> np.ndarray:
    """LCM-distilled U-Nets' timestep_cond: (n, dim) float32, the embedding of (guidance - 1) x 1000 as diffusers'
    LatentConsistencyModelPipeline.get_guidance_scale_embedding makes it, in its order of float32 operations."""
    half = dim // 2
    step = np.float32(np.log(np.float32(10000))) / np.float32(half - 1)
    w = np.full((n,), (np.float32(guidance) - np.float32(1)) * np.float32(1000), dtype=np.float32)
    return _sin_cos(w, np.exp(np.arange(half, dtype=np.float32) * -step), dim, cos_first=False)
