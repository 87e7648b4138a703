"""Depth to image (diffusers' StableDiffusionDepth2ImgPipeline): img2img whose U-Net also sees a depth
map at latent size, given by the user (--depth-map) or estimated from the init image by the folder's
DPT depth estimator engine."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..depth import depth_condition, dpt_pixel_values
from ..errors import SdrtError
from ..image_input import default_size, image_tensor
from .base import Start, Task, encode


class Depth(Task):
    name = "depth"
    takes = ("init_image", "depth_map", "strength")
    default_strength = 0.8

    def default_size(self, req, factor):
        return default_size(req.init_image, factor)

    def check(self, req, s, info):
        if req.depth_map is not None and (not np.isfinite(req.depth_map).all() or req.depth_map.ndim != 2):
            raise SdrtError("--depth-map must be a 2-D array of finite depths")
        if req.depth_map is None and info.depth_processor is None:
            raise SdrtError("these engines have no depth estimator (the model had none): give --depth-map")

    def start(self, pipe, req, s, scheduler, noise):
        n, f = req.num_images, pipe.info.vae_scale_factor
        image = req.init_image
        if (s.height, s.width) != default_size(image, f):  # --height/--width: the image is resized first, depth estimated from that
            image = image.resize((s.width, s.height), resample=Image.Resampling.LANCZOS)
        depth = req.depth_map
        if depth is None:
            depth = pipe.engine("depth_estimator").run({"pixel_values": dpt_pixel_values(image, pipe.info.depth_processor)})["predicted_depth"][0]
        condition = np.repeat(depth_condition(depth, image.height // f, image.width // f), n, axis=0)  # (n, 1, h, w)
        latents = encode(pipe, image_tensor(image, s.height, s.width), noise, n)  # drawn before the noise, as diffusers draws it
        return Start(scheduler.add_noise(latents, noise.randn(latents.shape), scheduler.begin), unet_extra=condition)
