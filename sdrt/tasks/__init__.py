"""The tasks one engine folder can run, and which one a request asks for."""

from __future__ import annotations

from ..errors import SdrtError
from ..model_info import ModelInfo
from .base import Start, Task
from .depth import Depth
from .img2img import Img2Img
from .inpaint import Inpaint
from .txt2img import Txt2Img
from .unclip import UnClip
from .upscale import Upscale

TASKS: dict[str, Task] = {t.name: t for t in (Txt2Img(), Img2Img(), Inpaint(), Depth(), Upscale(), UnClip())}
FLAGS = {"init_image": "--init-image", "image": "--image", "mask": "--mask", "strength": "--strength", "mask_blur": "--mask-blur",
         "depth_map": "--depth-map", "noise_level": "--noise-level"}
UNSET = {"init_image": None, "image": None, "mask": None, "strength": None, "mask_blur": 0.0, "depth_map": None, "noise_level": None}


def model_tasks(info: ModelInfo) -> tuple[str, ...]:
    """What a model's U-Net can do, from its input channels and class labels."""
    c, vae = info.latent_channels, info.vae_latent_channels
    if info.class_labels == "noise_level":  # latents, the noised low-resolution image
        return ("upscale",)
    if info.class_labels == "image_embeds":  # latents; the image embedding as class labels
        return ("unclip",)
    if c == vae:
        return ("txt2img", "img2img", "inpaint")
    if c == 2 * vae + 1:  # latents, mask, masked-image latents
        return ("inpaint",)
    if c == vae + 1:  # latents, depth
        return ("depth",)
    raise SdrtError(f"a U-Net with {c} input channels (VAE latents: {vae}) is not supported yet: sdrt runs text-to-image U-Nets "
                    f"({vae} channels), inpainting U-Nets ({2 * vae + 1}) and depth-to-image U-Nets ({vae + 1})")


def requested_task(req, available: tuple[str, ...]) -> Task:
    """The task the request's inputs ask for; an error naming the flags if the folder cannot run it."""
    if req.init_image is not None and (req.image is not None or req.mask is not None):
        raise SdrtError("--init-image (img2img) and --image/--mask (inpainting) cannot be combined: give one task's inputs")
    if req.init_image is not None:
        name = "depth" if "depth" in available else "img2img"
    elif req.image is not None and req.mask is None and available[0] in ("upscale", "unclip"):
        name = available[0]
    elif req.image is not None or req.mask is not None:
        if req.image is None or req.mask is None:
            raise SdrtError(f"inpainting needs both --image and --mask; {'--image' if req.image is None else '--mask'} is missing")
        name = "inpaint"
    else:
        name = "txt2img"
    if name not in available:
        needs = {"img2img": "--init-image", "inpaint": "--image and --mask", "txt2img": "no input image", "depth": "--init-image",
                 "upscale": "--image", "unclip": "--image"}
        raise SdrtError(f"these engines run {', '.join(available)}, not {name}; give {' or '.join(needs[t] for t in available)}")
    task = TASKS[name]
    for field, flag in FLAGS.items():
        value, unset = getattr(req, field), UNSET[field]
        if field not in task.takes and (value is not None if unset is None else value != unset):
            users = [t.name for t in TASKS.values() if field in t.takes and t.name in available]
            raise SdrtError(f"{flag} does not apply to {name}: it is for {', '.join(users) or 'tasks these engines do not run'}")
    return task


__all__ = ["TASKS", "Start", "Task", "model_tasks", "requested_task"]
