"""Image to image (diffusers' StableDiffusionImg2ImgPipeline): the init image's latents, noised to the
level of the first step that the strength leaves to run."""

from __future__ import annotations

from ..image_input import default_size, image_tensor
from .base import Start, Task, encode


class Img2Img(Task):
    name = "img2img"
    takes = ("init_image", "strength")
    default_strength = 0.8

    def default_size(self, req, factor):
        return default_size(req.init_image, factor)

    def start(self, pipe, req, s, scheduler, noise):
        pixels = image_tensor(req.init_image, s.height, s.width)  # (1, 3, H, W)
        latents = encode(pipe, pixels, noise, req.num_images)  # drawn before the noise, as diffusers draws it
        return Start(scheduler.add_noise(latents, noise.randn(latents.shape), scheduler.begin))
