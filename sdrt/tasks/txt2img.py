"""Text to image: the loop starts from unit noise times the scheduler's initial sigma."""

from __future__ import annotations

import numpy as np

from .base import Start, Task, latent_shape


class Txt2Img(Task):
    name = "txt2img"

    def start(self, pipe, req, s, scheduler, noise):
        return Start(noise.randn(latent_shape(pipe, s, req.num_images)) * np.float32(scheduler.init_noise_sigma))
