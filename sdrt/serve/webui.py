"""The AUTOMATIC1111 WebUI's API (`/sdapi/v1/*`) on sdrt: its request fields mapped to a GenerateRequest,
its response shape. Clients such as `webuiapi` send some 40 fields; those that do not change the image
(saving, grids, script plumbing) are ignored, those that would (hires fix, face restoration, tiling,
variation seeds, scripts) are refused unless left at their defaults, so that no image is silently
not what was asked."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..errors import SdrtError
from ..image_input import load_image_bytes
from ..pipeline import GenerateRequest
from ..schedulers import WEBUI_NAME_OF, WEBUI_SAMPLERS, resolve_scheduler

SCHEDULE_TYPES = ("automatic", "uniform", "karras")  # the WebUI's `scheduler` field values sdrt has
KARRAS_BY_DEFAULT = ("dpmpp_2m",)  # WebUI >= 1.9: "DPM++ 2M" with schedule "automatic" is the Karras schedule
MAX_SEED = 2**32 - 1


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of the field; sampler_name wins
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    # fields that change the image in the WebUI and have no sdrt counterpart: accepted only at their defaults
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    script_name: str | None = None
    alwayson_scripts: dict = {}


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = []
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_mask_invert: int = 0
    inpaint_full_res: bool | int = False
    resize_mode: int = 0


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 image as clients send it (optionally a data: URL)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SdrtError(f"{field}: not base64 image data") from None
    return load_image_bytes(raw, field)


def _refuse_unsupported(r: Txt2ImgRequest) -> None:
    if r.enable_hr:
        raise SdrtError("enable_hr: hires fix is not supported by sdrt (upscale with an x4 upscaler engine folder instead)")
    for name in ("restore_faces", "tiling"):
        if getattr(r, name):
            raise SdrtError(f"{name}: not supported by sdrt; send false")
    if r.subseed_strength:
        raise SdrtError("subseed_strength: variation seeds are not supported by sdrt; send 0")
    if r.script_name or any(r.alwayson_scripts.values()):
        raise SdrtError("script_name / alwayson_scripts: WebUI scripts and extensions are not available in sdrt")


def sampler(r: Txt2ImgRequest) -> tuple[str, bool]:
    """(sdrt scheduler, Karras sigmas) from sampler_name (else sampler_index) and the schedule type."""
    name = r.sampler_name or r.sampler_index or "Euler a"
    schedule = (r.scheduler or "automatic").lower()
    if schedule not in SCHEDULE_TYPES:
        raise SdrtError(f"scheduler {r.scheduler!r} is not supported: accepted values are {', '.join(SCHEDULE_TYPES)}")
    try:
        scheduler, karras = resolve_scheduler(name, False)
    except SdrtError:
        raise SdrtError(f"sampler_name {name!r} is not supported: accepted values are {', '.join(WEBUI_SAMPLERS)}") from None
    return scheduler, karras or schedule == "karras" or (schedule == "automatic" and scheduler in KARRAS_BY_DEFAULT)


def generate_request(r: Txt2ImgRequest, images: dict[str, Any] | None = None) -> GenerateRequest:
    _refuse_unsupported(r)
    if not 1 <= r.batch_size * r.n_iter:
        raise SdrtError("batch_size and n_iter must be >= 1")
    seed = secrets.randbelow(MAX_SEED + 1) if r.seed == -1 else r.seed
    if not 0 <= seed <= MAX_SEED:
        raise SdrtError(f"seed {r.seed} is out of range: accepted values are -1 (random) or 0 .. {MAX_SEED}")
    scheduler, karras = sampler(r)
    return GenerateRequest(prompt=r.prompt, negative_prompt=r.negative_prompt, steps=r.steps, guidance=r.cfg_scale, seed=seed,
                           scheduler=scheduler, karras=karras, height=r.height, width=r.width, num_images=r.batch_size * r.n_iter,
                           batch_noise="per-image", **(images or {}))  # the WebUI gives image i the seed + i


def img2img_inputs(r: Img2ImgRequest) -> dict[str, Any]:
    """GenerateRequest fields of an img2img or inpainting request."""
    if len(r.init_images) != 1:
        raise SdrtError(f"init_images: give exactly one image (got {len(r.init_images)})")
    if r.resize_mode != 0:
        raise SdrtError("resize_mode: only 0 (just resize) is supported by sdrt")
    image = decode_image(r.init_images[0], "init_images[0]")
    if r.mask is None:
        return {"init_image": image, "strength": r.denoising_strength}
    if r.inpaint_full_res:  # the WebUI's default, which only matters with a mask
        raise SdrtError("inpaint_full_res: inpainting only the masked area at full resolution is not supported by sdrt; send false "
                        "(sdrt inpaints the whole image, as diffusers' inpainting pipeline does; inpainting_fill is not used)")
    mask = decode_image(r.mask, "mask").convert("L")
    if r.inpainting_mask_invert:
        mask = Image.eval(mask, lambda v: 255 - v)
    return {"image": image, "mask": mask, "strength": r.denoising_strength, "mask_blur": r.mask_blur}


def info_json(req: GenerateRequest, metadata: list[dict], infotexts: list[str], model_name: str) -> str:
    """The `info` string of a WebUI response (a JSON document in a string, as the WebUI sends it)."""
    first = metadata[0]
    return json.dumps({
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(metadata), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(metadata), "seed": req.seed,
        "all_seeds": [m["image_seed"] for m in metadata], "subseed": -1, "all_subseeds": [-1] * len(metadata), "subseed_strength": 0,
        "width": first["width"], "height": first["height"], "sampler_name": WEBUI_NAME_OF.get(first["scheduler"], first["scheduler"]),
        "scheduler": "Karras" if first["karras_sigmas"] else "Uniform", "cfg_scale": first["guidance"], "steps": first["steps"],
        "batch_size": len(metadata), "denoising_strength": first.get("strength"), "sd_model_name": model_name,
        "sd_model_hash": first["model_hash"], "infotexts": infotexts, "job_timestamp": None, "version": f"sdrt {_version()}",
    })


def _version() -> str:
    from .. import __version__

    return __version__


def sd_models(name: str, path: str, model_hash: str) -> list[dict]:
    return [{"title": f"{name} [{model_hash}]", "model_name": name, "hash": model_hash, "sha256": None, "filename": path, "config": None}]


def samplers() -> list[dict]:
    return [{"name": webui, "aliases": [name], "options": {}} for webui, (name, _) in WEBUI_SAMPLERS.items()]
