"""Stable unCLIP image variations (diffusers' StableUnCLIPImg2ImgPipeline): the image's CLIP embedding,
normalised, noised to --noise-level by its DDPM schedule, un-normalised and joined by the noise level's
sinusoidal embedding, is the U-Net's class label; the unconditional half gets zeros. The prompt is
optional. Random draws: the embedding noise (drawn even at level 0), then the latents."""

from __future__ import annotations

import numpy as np

from ..clip_image import clip_pixel_values
from ..errors import SdrtError
from ..noise import PerImageNoise
from ..schedulers.config import CommonConfig, parse_config
from ..schedulers.schedule import alphas_cumprod, vp_add_noise
from .base import Start, Task, latent_shape, sinusoidal_embedding

SIZE_MULTIPLE = 8  # diffusers' unCLIP pipeline requires it whatever the VAE factor


class UnClip(Task):
    name = "unclip"
    takes = ("image", "noise_level")

    @staticmethod
    def noise_level(req) -> int:
        return 0 if req.noise_level is None else req.noise_level

    def check(self, req, s, info):
        top = parse_config(CommonConfig, info.image_noising_scheduler).num_train_timesteps - 1
        level = self.noise_level(req)
        if not 0 <= level <= top:
            raise SdrtError(f"--noise-level {level} is out of range: accepted values are 0 .. {top} (the image noising schedule's steps)")
        for option, value in (("--height", s.height), ("--width", s.width)):
            if value % SIZE_MULTIPLE:
                raise SdrtError(f"{option} {value} is not accepted by unCLIP models: a multiple of {SIZE_MULTIPLE}")

    def start(self, pipe, req, s, scheduler, noise):
        n, info, level = req.num_images, pipe.info, self.noise_level(req)
        embeds = pipe.engine("image_encoder").run({"pixel_values": clip_pixel_values(req.image, info.clip_processor)})["image_embeds"]  # (1, D)
        mean, std = (np.asarray(info.image_normalizer[k], dtype=np.float32)[None] for k in ("mean", "std"))  # (1, D) each
        draws = n if isinstance(noise, PerImageNoise) else 1
        embed_noise = noise.randn((draws, embeds.shape[1]))
        scaled = (embeds - mean) * np.float32(1.0) / std
        noised = vp_add_noise(alphas_cumprod(parse_config(CommonConfig, info.image_noising_scheduler)), level, scaled, embed_noise) * std + mean
        labels = np.concatenate([noised, sinusoidal_embedding(np.full((draws,), level), embeds.shape[1], cos_first=True, shift=0)], axis=1)  # (draws, 2D)
        labels = np.ascontiguousarray(np.broadcast_to(labels, (n, labels.shape[1])))
        latents = noise.randn(latent_shape(pipe, s, n)) * np.float32(scheduler.init_noise_sigma)
        return Start(latents, unet_feeds={"class_labels": labels}, unconditional_feeds={"class_labels": np.zeros_like(labels)})
