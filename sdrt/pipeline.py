"""txt2img: tokenizer -> text encoder -> scheduler loop over the U-Net -> VAE decoder, in NumPy.

Follows diffusers' StableDiffusionPipeline step for step (same noise stream, same classifier-free
guidance batch order [negative, positive], same post-processing), so that the same model, seed
and scheduler give the same image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .components import ComponentSpec
from .engines.base import LoadConfig, engine_class
from .errors import SdrtError
from .manifest import load_manifest, model_hash, verify_files
from .model_info import ModelInfo
from .noise import make_noise
from .schedulers import default_scheduler_name, make_scheduler
from .tokenizer import CLIPTokenizer

TXT2IMG_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None  # None: the model's own scheduler
    karras: bool = False
    height: int | None = None  # None: the model's default size
    width: int | None = None
    num_images: int = 1
    noise: str = "torch"


def _check_request(req: GenerateRequest, info: ModelInfo) -> tuple[int, int]:
    height = info.default_height if req.height is None else req.height
    width = info.default_width if req.width is None else req.width
    f = info.vae_scale_factor
    for option, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % f:
            raise SdrtError(f"{option} {value} is not accepted: it must be a positive multiple of {f} (the VAE scale factor)")
    if req.num_images < 1:
        raise SdrtError(f"--num-images {req.num_images} must be >= 1")
    if not np.isfinite(req.guidance) or req.guidance < 0:
        raise SdrtError(f"--guidance {req.guidance} must be a finite number >= 0")
    return height, width


class StableDiffusion:
    def __init__(self, engine_dir: Path, device: str | None = None, threads: int = 0, verify: bool = True):
        self.manifest = load_manifest(engine_dir, verify=False)
        self.info = ModelInfo.from_json({k: v for k, v in self.manifest["model"].items() if k != "source"})
        backend = engine_class(self.manifest["backend"]["name"])
        cfg = LoadConfig(device=device or self.manifest["backend"]["device"], threads=threads)
        if verify:  # the hashes of what this run reads: tokenizer files and the engines it loads
            tokenizer_files = [engine_dir / rel for rel in self.manifest["files"] if rel.startswith("tokenizer/")]
            engine_files = [p for name in TXT2IMG_COMPONENTS for p in backend.files_to_load(engine_dir / name, cfg)]
            verify_files(engine_dir, self.manifest, tokenizer_files + engine_files)
        self.tokenizer = CLIPTokenizer(engine_dir / "tokenizer")
        self.engines = {}
        for name in TXT2IMG_COMPONENTS:
            spec = ComponentSpec.from_json(self.manifest["components"][name]["spec"])
            self.engines[name] = backend.load(engine_dir / name, spec, cfg)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def _encode_text(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts).astype(np.int64)  # (P, 77)
        return self.engines["text_encoder"].run({"input_ids": ids})["last_hidden_state"]  # (P, 77, D) float32

    def generate(self, req: GenerateRequest, progress: bool = True) -> list[np.ndarray]:
        """-> num_images arrays (H, W, 3) uint8."""
        height, width = _check_request(req, self.info)
        scheduler = make_scheduler(req.scheduler or default_scheduler_name(self.manifest["scheduler_config"]),
                                   self.manifest["scheduler_config"], karras_sigmas=req.karras)
        scheduler.set_timesteps(req.steps)
        noise = make_noise(req.noise, req.seed)
        n = req.num_images
        guided = req.guidance > 1.0

        # text embeddings: (2n, S, D) = [negative x n, positive x n] with guidance, else (n, S, D)
        if guided:
            negative, positive = self._encode_text([req.negative_prompt, req.prompt])
            context = np.concatenate([np.repeat(negative[None], n, 0), np.repeat(positive[None], n, 0)])
        else:
            context = np.repeat(self._encode_text([req.prompt]), n, 0)

        f = self.info.vae_scale_factor
        shape = (n, self.info.latent_channels, height // f, width // f)
        latents = noise.randn(shape) * np.float32(scheduler.init_noise_sigma)  # (n, C, h, w) float32
        unet = self.engines["unet"]
        guidance = np.float32(req.guidance)
        for i in tqdm(range(len(scheduler.timesteps)), desc="denoising", unit="step", disable=None if progress else True, leave=False):
            model_input = np.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, i)
            timestep = np.full((model_input.shape[0],), scheduler.timesteps[i], dtype=np.float32)
            out = unet.run({"sample": model_input, "timestep": timestep, "encoder_hidden_states": context})["out_sample"]
            if guided:
                uncond, cond = out[:n], out[n:]
                out = uncond + guidance * (cond - uncond)
            step_noise = noise.randn(latents.shape) if scheduler.needs_noise else None
            latents = scheduler.step(out, i, latents, step_noise)
        if not np.isfinite(latents).all():
            raise SdrtError("the denoising loop produced NaN or infinite latents; the engines are numerically broken for this model and precision")

        images = []
        scaled = latents / np.float32(self.info.scaling_factor)
        for k in range(n):
            image = self.engines["vae_decoder"].run({"latent_sample": scaled[k : k + 1]})["sample"][0]  # (3, H, W) in [-1, 1]
            image = np.clip(image / np.float32(2) + np.float32(0.5), 0, 1).transpose(1, 2, 0)
            images.append((image * 255).round().astype(np.uint8))
        return images

    def metadata(self, req: GenerateRequest, index: int) -> dict[str, Any]:
        height, width = _check_request(req, self.info)
        return {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "steps": req.steps,
            "scheduler": req.scheduler or default_scheduler_name(self.manifest["scheduler_config"]),
            "karras_sigmas": req.karras,
            "guidance": req.guidance,
            "seed": req.seed,
            "image_index": index,
            "noise": req.noise,
            "height": height,
            "width": width,
            "model_hash": model_hash(self.manifest),
            "backend": self.manifest["backend"]["name"],
            "precision": self.manifest["precision"],
        }
