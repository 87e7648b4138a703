"""x4 upscaling (diffusers' StableDiffusionUpscalePipeline): the low-resolution image, noised to
--noise-level by its own DDPM schedule, is concatenated to the latents at every step, and the noise
level is the U-Net's class label; latents have the low-resolution image's size and the VAE (scale
factor 4) decodes them to four times that. Random draws: the low-resolution noise, then the latents."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import SdrtError
from ..image_input import image_tensor
from ..noise import PerImageNoise
from ..schedulers.config import CommonConfig, parse_config
from ..schedulers.schedule import alphas_cumprod, vp_add_noise
from .base import Start, Task, latent_shape

DEFAULT_NOISE_LEVEL = 20


class Upscale(Task):
    name = "upscale"
    takes = ("image", "noise_level")
    # latents have the input's size: inputs above 128x128 are upscaled in tiles, so memory follows the tile and not the
    # input (a 128x128 latent tile's VAE attention scores take 1 GiB; a 256x256 one's would take 16 GiB)
    default_tile = 128

    def default_size(self, req, factor):
        """The output: the input's size rounded down to a multiple of the VAE factor, times that factor."""
        return (req.image.height - req.image.height % factor) * factor, (req.image.width - req.image.width % factor) * factor

    def check(self, req, s, info):
        level, top = self.noise_level(req), info.max_noise_level
        if not 0 <= level <= top:
            raise SdrtError(f"--noise-level {level} is out of range: accepted values are 0 .. {top} (the model's max_noise_level)")

    @staticmethod
    def noise_level(req) -> int:
        return DEFAULT_NOISE_LEVEL if req.noise_level is None else req.noise_level

    def start(self, pipe, req, s, scheduler, noise):
        n, f, level = req.num_images, pipe.info.vae_scale_factor, self.noise_level(req)
        low = image_tensor(req.image, s.height // f, s.width // f, Image.Resampling.BICUBIC)  # (1, 3, h, w) in [-1, 1]
        low_noise = noise.randn((n if isinstance(noise, PerImageNoise) else 1, *low.shape[1:]))
        schedule = alphas_cumprod(parse_config(CommonConfig, pipe.info.low_res_scheduler))
        low = np.ascontiguousarray(np.broadcast_to(vp_add_noise(schedule, level, low, low_noise), (n, *low.shape[1:])))
        latents = noise.randn(latent_shape(pipe, s, n)) * np.float32(scheduler.init_noise_sigma)  # (n, C, h, w)
        return Start(latents, unet_extra=low, unet_feeds={"class_labels": np.full((n,), level, dtype=np.int64)})
