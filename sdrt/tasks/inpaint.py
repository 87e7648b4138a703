"""Inpainting (diffusers' StableDiffusionInpaintPipeline): white in the mask is repainted.

9-channel inpainting U-Nets see, after the latents, the mask at latent size and the latents of the
image with the repainted region blanked. Ordinary 4-channel models blend instead: after every step,
what lies outside the mask is replaced by the image's latents noised to the next step's level.
Random draws in diffusers' order: image latents (4-channel models, or strength < 1), the starting
noise, then the masked image's latents (drawn even where unused).
"""

from __future__ import annotations

import numpy as np

from ..errors import SdrtError
from ..image_input import default_size, image_tensor, mask_tensor
from .base import Start, Task, encode, latent_shape


class Inpaint(Task):
    name = "inpaint"
    takes = ("image", "mask", "strength", "mask_blur")
    default_strength = 1.0

    def default_size(self, req, factor):
        return default_size(req.image, factor)

    def check(self, req, s, info):
        if req.mask.size != req.image.size:
            raise SdrtError(f"--mask is {req.mask.width}x{req.mask.height} but --image is {req.image.width}x{req.image.height}: "
                            "give a mask of the image's size")
        if not np.isfinite(req.mask_blur) or req.mask_blur < 0:
            raise SdrtError(f"--mask-blur {req.mask_blur} must be a finite radius >= 0 (pixels)")

    def start(self, pipe, req, s, scheduler, noise):
        n, f = req.num_images, pipe.info.vae_scale_factor
        pixels = image_tensor(req.image, s.height, s.width)  # (1, 3, H, W) in [-1, 1]
        mask = mask_tensor(req.mask, s.height, s.width, req.mask_blur)  # (1, 1, H, W): 1 = repaint
        blends = pipe.info.latent_channels == pipe.info.vae_latent_channels
        from_noise = s.strength == 1.0
        image_latents = encode(pipe, pixels, noise, n) if blends or not from_noise else None
        start_noise = noise.randn(latent_shape(pipe, s, n))
        if from_noise:
            latents = start_noise * np.float32(scheduler.init_noise_sigma)
        else:
            latents = scheduler.add_noise(image_latents, start_noise, scheduler.begin)
        masked_latents = encode(pipe, pixels * (mask < 0.5), noise, n)
        mask_latents = np.repeat(mask[:, :, ::f, ::f], n, axis=0)  # (n, 1, h, w): nearest downsampling by f
        if not blends:
            return Start(latents, unet_extra=np.concatenate([mask_latents, masked_latents], axis=1))
        keep = np.float32(1.0) - mask_latents

        def blend(x: np.ndarray, i: int) -> np.ndarray:
            proper = scheduler.add_noise(image_latents, start_noise, i + 1) if i + 1 < len(scheduler.timesteps) else image_latents
            return keep * proper + mask_latents * x

        return Start(latents, after_step=blend)
