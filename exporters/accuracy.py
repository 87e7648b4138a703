"""The build's fp32 reference runs: recorded U-Net inputs for int8 calibration, and the accuracy
report of built engines against fp32 (per component max abs error and cosine similarity on the
inputs the reference really saw; image PSNR end to end)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from sdrt.pipeline import GenerateRequest, StableDiffusion


class RecordingEngine:
    """Passes runs through to an engine and keeps copies of the feeds and outputs."""

    def __init__(self, engine, keep_every: int = 1):
        self.engine, self.keep_every, self.calls = engine, keep_every, 0
        self.feeds: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.engine.run(feeds)
        if self.calls % self.keep_every == 0:
            self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
            self.outputs.append({k: np.array(v, copy=True) for k, v in out.items()})
        self.calls += 1
        return out

    def close(self) -> None:
        self.engine.close()


def _task_inputs(tasks: tuple[str, ...], size: tuple[int, int], seed: int, factor: int) -> dict:
    """What a model that cannot draw from text alone needs: a smooth picture (inpainting models: with its
    middle masked; depth-to-image models: to estimate depth from)."""
    if "txt2img" in tasks:
        return {}
    height, width = size
    colours = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    picture = Image.fromarray(colours).resize((width, height), Image.Resampling.BICUBIC)
    if "depth" in tasks:
        return {"init_image": picture}
    if "upscale" in tasks:
        return {"image": picture.resize((width // factor, height // factor), Image.Resampling.BICUBIC)}
    if "unclip" in tasks:
        return {"image": picture}
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return {"image": picture, "mask": Image.fromarray(mask)}


def _requests(pipe: StableDiffusion, prompts: list[str], steps: int, size: tuple[int, int], num_images: int = 1) -> list[GenerateRequest]:
    """The build's reference runs, in the model's own task (its U-Net's calibration data are its own inputs)."""
    return [GenerateRequest(prompt=p, steps=steps, guidance=7.5, seed=1000 + k, scheduler="dpmpp_2m", height=size[0], width=size[1],
                            num_images=num_images, **_task_inputs(pipe.tasks, size, k, pipe.info.vae_scale_factor)) for k, p in enumerate(prompts)]


def record_unet_inputs(reference: StableDiffusion, prompts: list[str], steps: int, size: tuple[int, int]) -> dict[str, list[dict[str, np.ndarray]]]:
    """{component: its actual inputs} over every step of fp32 runs of `prompts`: the U-Net's, and with step caching
    its shallow pass's as cached runs feed it (each step's inputs with the feature the previous step's U-Net kept)."""
    unet = reference.engines["unet"]
    recorded: dict[str, list[dict[str, np.ndarray]]] = {"unet": []}
    if "unet_shallow" in reference.engines:
        recorded["unet_shallow"] = []
    try:
        for req in _requests(reference, prompts, steps, size):
            recorder = reference.engines["unet"] = RecordingEngine(unet)
            reference.generate(req, progress=False)
            recorded["unet"] += recorder.feeds
            if "unet_shallow" in recorded:
                recorded["unet_shallow"] += [{**feeds, "deep_feature": kept["deep_feature"]}
                                             for feeds, kept in zip(recorder.feeds[1:], recorder.outputs)]
    finally:
        reference.engines["unet"] = unet
    return recorded


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom else 1.0
    return float(np.abs(a - b).max()), cosine


def reference_runs(reference: StableDiffusion, prompts: list[str], steps: int, size: tuple[int, int], num_images: int = 1) -> dict:
    """What candidates are compared with: the reference's images of `prompts` (fixed seeds) and, per component, inputs
    it really saw with its outputs. Held as arrays, so that the reference can be closed before a candidate loads."""
    recorders = {name: RecordingEngine(engine, keep_every=4 if name == "unet" else 1) for name, engine in reference.engines.items()}
    reference.engines.update(recorders)
    requests = _requests(reference, prompts, steps, size, num_images)
    try:
        images = [image for req in requests for image in reference.generate(req, progress=False)]
        encoder = recorders["vae_encoder"]
        if not encoder.feeds:  # the task draws from text alone: the encoder sees the reference's own images, in [-1, 1]
            for image in images[:2]:
                encoder.run({"sample": (image.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(127.5) - 1)})
    finally:
        reference.engines.update({name: r.engine for name, r in recorders.items()})
    return {"prompts": prompts, "steps": steps, "size": size, "requests": requests, "images": images,
            "components": {name: list(zip(r.feeds, r.outputs)) for name, r in recorders.items()}}


def accuracy_report(runs: dict, candidate: StableDiffusion) -> dict:
    """Images and components of `candidate` against the reference's `runs` (reference_runs) on the same prompts and seeds."""
    ours = [image for req in runs["requests"] for image in candidate.generate(req, progress=False)]
    psnrs = [psnr(a, b) for a, b in zip(ours, runs["images"])]
    components = {}
    for name, recorded in runs["components"].items():
        worst_abs, worst_cos = 0.0, 1.0
        for feeds, ref_out in recorded:
            out = candidate.engines[name].run(feeds)
            for key, value in ref_out.items():
                max_abs, cosine = _errors(out[key], value)
                worst_abs, worst_cos = max(worst_abs, max_abs), min(worst_cos, cosine)
        components[name] = {"max_abs_error": worst_abs, "cosine_similarity": worst_cos}
    height, width = runs["size"]
    return {
        "prompts": runs["prompts"], "steps": runs["steps"], "height": height, "width": width, "scheduler": "dpmpp_2m", "guidance": 7.5,
        "image_psnr_db": psnrs, "min_image_psnr_db": min(psnrs), "components": components,
    }
