"""OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`) on sdrt: its request fields, its response
and error shapes. `seed`, `negative_prompt`, `steps`, `guidance` and (edits) `strength` are accepted as
extensions (the official client sends them with `extra_body`); without a seed each request draws a random
one, as OpenAI's service does. Edits follow OpenAI's mask convention: the mask's (or, without a mask, the
image's own) fully transparent pixels are the area to paint; with no transparency at all the whole image
is reworked (img2img at `strength`, default 0.8)."""

from __future__ import annotations

import io
import secrets
import time

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..image_input import load_image_bytes

from ..pipeline import GenerateRequest

MAX_SEED = 2**32 - 1


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # model, quality, style, user, background ...: nothing to choose here

    prompt: str
    n: int = 1
    size: str | None = None  # "WIDTHxHEIGHT"; default: the model's size
    response_format: str | None = None  # only b64_json: sdrt stores no images to link to
    seed: int | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def generate_request(r: ImagesRequest, images: dict | None = None) -> GenerateRequest:
    if r.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format {r.response_format!r} is not supported: sdrt answers with b64_json only", "response_format")
    height = width = None
    if r.size is not None and r.size != "auto":
        try:
            width, height = (int(v) for v in r.size.lower().split("x"))
        except ValueError:
            raise ApiError(400, f"size {r.size!r} is not WIDTHxHEIGHT, e.g. 512x512", "size") from None
    seed = secrets.randbelow(MAX_SEED + 1) if r.seed is None else r.seed
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed {r.seed} is out of range: accepted values are 0 .. {MAX_SEED}", "seed")
    return GenerateRequest(prompt=r.prompt, negative_prompt=r.negative_prompt, seed=seed, height=height, width=width, num_images=r.n,
                           steps=r.steps, guidance=r.guidance, batch_noise="per-image", **(images or {}))


def _transparent(data: bytes, field: str) -> Image.Image | None:
    """The fully transparent pixels of a PNG as a white-on-black mask (sdrt's convention), or None without any."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
                return None
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
    except (OSError, ValueError):
        raise ApiError(400, f"{field}: not an image Pillow can read; send a PNG", field) from None
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L") if (alpha == 0).any() else None


def edit_inputs(image: bytes, mask: bytes | None, strength: float | None) -> dict:
    """GenerateRequest fields of an edit: inpainting where the mask (or the image) is transparent, else img2img."""
    picture = load_image_bytes(image, "image")
    area = _transparent(mask, "mask") if mask is not None else _transparent(image, "image")
    if mask is not None and area is None:
        raise ApiError(400, "mask: it has no fully transparent pixels; OpenAI's convention is alpha 0 where the image is to be edited", "mask")
    if area is None:
        return {"init_image": picture, "strength": 0.8 if strength is None else strength}
    return {"image": picture, "mask": area, **({} if strength is None else {"strength": strength})}


def response(b64_pngs: list[str]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": None} for b64 in b64_pngs]}

