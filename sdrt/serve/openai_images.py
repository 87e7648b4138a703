"""OpenAI's Images API (`/v1/images/generations`) on sdrt: its request fields, its response and error shapes.
`seed` and `negative_prompt` are accepted as extensions (the official client sends them with `extra_body`);
without a seed each request draws a random one, as OpenAI's service does."""

from __future__ import annotations

import secrets
import time

from pydantic import BaseModel, ConfigDict

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


def generate_request(r: ImagesRequest) -> GenerateRequest:
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
                           steps=r.steps, guidance=r.guidance, batch_noise="per-image")


def response(b64_pngs: list[str]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": None} for b64 in b64_pngs]}

