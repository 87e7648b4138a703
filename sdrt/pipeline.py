"""txt2img: tokenizer -> text encoder -> scheduler loop over the U-Net -> VAE decoder, in NumPy.

Follows diffusers' StableDiffusionPipeline step for step (same noise stream, same classifier-free
guidance batch order [negative, positive], same post-processing), so that the same model, seed
and scheduler give the same image. The pipeline sees engines only through `Engine.run`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .components import ComponentSpec
from .engines.base import Engine, LoadConfig, engine_class
from .errors import SdrtError
from .manifest import CONTENT_HASH, load_manifest, model_hash, verify_files
from .memory import attention_bytes, check_fits
from .model_info import ModelInfo
from .noise import make_batch_noise
from .schedulers import default_scheduler_name, make_scheduler, resolve_scheduler
from .tokenizer import TOKENIZER_FILES, CLIPTokenizer
from .verified import VERIFY_MODES, VerifiedFiles

log = logging.getLogger(__name__)

TXT2IMG_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
LONG_PROMPTS = ("truncate", "chunk")
USEFUL_GUIDANCE = 30.0  # classifier-free guidance scales above this only saturate the image
BUILTIN_DEFAULTS = {"steps": 20, "guidance": 7.5}


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's recommended value, else 20
    guidance: float | None = None  # None: the model's recommended value, else 7.5
    seed: int = 0
    scheduler: str | None = None  # None: the model's recommended scheduler, else its own class
    karras: bool = False
    height: int | None = None  # None: the model's recommended size, else its sample size
    width: int | None = None
    num_images: int = 1
    noise: str = "torch"
    batch_noise: str = "shared"  # shared: one generator for the batch (diffusers); per-image: image i uses seed + i
    long_prompts: str = "truncate"  # truncate (as diffusers) or chunk (the WebUI's 75-token chunks, embeddings concatenated)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A request with every default resolved and checked."""

    steps: int
    guidance: float
    scheduler: str
    karras: bool
    height: int
    width: int


def describe_works(works: dict) -> str:
    parts = []
    if "schedulers" in works:
        parts.append("/".join(works["schedulers"]))
    if "min_steps" in works:
        parts.append(f">= {works['min_steps']} steps")
    if "guidance" in works:
        parts.append(f"guidance {works['guidance'][0]:g} .. {works['guidance'][1]:g}")
    if "sizes" in works:
        parts.append(" or ".join(f"{h}x{w}" for h, w in works["sizes"]))
    return ", ".join(parts)


class StableDiffusion:
    def __init__(self, info: ModelInfo, scheduler_config: dict, tokenizer: CLIPTokenizer, engines: Mapping[str, Engine],
                 defaults: dict | None = None, static_shape: dict | None = None):
        self.info = info
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.engines = dict(engines)
        self.defaults = defaults or {}
        self.static_shape = static_shape
        self.manifest: dict | None = None
        self.works: dict | None = None  # the model card's working range (sdrt.json "works"), where it has one

    @classmethod
    def from_engine_folder(cls, engine_dir: Path, device: str | None = None, threads: int = 0, verify: str = "changed") -> "StableDiffusion":
        """verify: always (hash every file it loads), changed (only those changed since this user last
        verified them: sdrt/verified.py), never (trust the folder; a warning says so)."""
        if verify not in VERIFY_MODES:
            raise SdrtError(f"--verify {verify!r} is not supported: accepted values are {', '.join(VERIFY_MODES)}")
        manifest = load_manifest(engine_dir, verify=False)
        backend = engine_class(manifest["backend"]["name"])
        cfg = LoadConfig(device=device or manifest["backend"]["device"], threads=threads, precision=manifest["precision"])
        if verify == "never":
            log.warning("--verify never: the hashes of %s's files are not checked", engine_dir)
        else:  # the hashes of what this run reads: tokenizer files and the engines it loads
            tokenizer_files = [engine_dir / "tokenizer" / n for n in TOKENIZER_FILES if os.path.lexists(engine_dir / "tokenizer" / n)]
            engine_files = [p for name in TXT2IMG_COMPONENTS for p in backend.files_to_load(engine_dir / name, cfg)]
            if cfg.device == manifest["backend"]["device"]:  # what the build made for this device must be there: no silent fallback
                engine_files += [engine_dir / rel for name in TXT2IMG_COMPONENTS for rel in manifest["components"][name]["artifacts"]]
            verified = VerifiedFiles(engine_dir, manifest[CONTENT_HASH]) if verify == "changed" else None
            verify_files(engine_dir, manifest, list(dict.fromkeys(tokenizer_files + engine_files)), verified)
        engines = {}
        for name in TXT2IMG_COMPONENTS:
            spec = ComponentSpec.from_json(manifest["components"][name]["spec"])
            engines[name] = backend.load(engine_dir / name, spec, cfg)
        info = ModelInfo.from_json({k: v for k, v in manifest["model"].items() if k != "source"})
        pipe = cls(info, manifest["scheduler_config"], CLIPTokenizer(engine_dir / "tokenizer"), engines,
                   manifest.get("defaults"), manifest.get("static_shape"))
        pipe.manifest = manifest
        pipe.works = manifest.get("works")
        return pipe

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def settings(self, req: GenerateRequest) -> Settings:
        d = {**BUILTIN_DEFAULTS, **self.defaults}
        scheduler, karras = resolve_scheduler(req.scheduler or d.get("scheduler") or default_scheduler_name(self.scheduler_config), req.karras)
        s = Settings(
            steps=d["steps"] if req.steps is None else req.steps,
            guidance=d["guidance"] if req.guidance is None else req.guidance,
            scheduler=scheduler,
            karras=karras,
            height=d.get("height", self.info.default_height) if req.height is None else req.height,
            width=d.get("width", self.info.default_width) if req.width is None else req.width,
        )
        for option, text in (("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SdrtError(f"{option} is not valid UTF-8 text (an undecodable byte at character {exc.start}); "
                                "give the prompt as UTF-8") from None
        f = self.info.vae_scale_factor
        for option, value in (("--height", s.height), ("--width", s.width)):
            if value <= 0 or value % f:
                raise SdrtError(f"{option} {value} is not accepted: it must be a positive multiple of {f} (the VAE scale factor)")
        if req.num_images < 1:
            raise SdrtError(f"--num-images {req.num_images} must be >= 1")
        if req.long_prompts not in LONG_PROMPTS:
            raise SdrtError(f"--long-prompts {req.long_prompts!r} is not supported: accepted values are {', '.join(LONG_PROMPTS)}")
        if req.long_prompts == "chunk" and self.static_shape:
            raise SdrtError("--long-prompts chunk needs engines with a dynamic text length; these were built with --static-shape")
        if not np.isfinite(s.guidance) or s.guidance < 0:
            raise SdrtError(f"--guidance {s.guidance} must be a finite number >= 0")
        if self.static_shape:
            want = self.static_shape
            if (s.height, s.width, req.num_images) != (want["height"], want["width"], want["batch"]) or s.guidance <= 1:
                raise SdrtError(f"these engines were built with static shapes for {want['height']}x{want['width']}, "
                                f"--num-images {want['batch']}, guidance > 1; generate with those or rebuild without --static-shape")
        return s

    def _outside_works(self, s: Settings) -> list[str]:
        """What in these settings leaves the model's working range (empty without one)."""
        works, problems = self.works or {}, []
        if "schedulers" in works and s.scheduler not in works["schedulers"]:
            problems.append(f"--scheduler {s.scheduler} is not one the model was checked with")
        if "min_steps" in works and s.steps < works["min_steps"]:
            problems.append(f"--steps {s.steps} is fewer than the model needs")
        if "guidance" in works and not works["guidance"][0] <= s.guidance <= works["guidance"][1]:
            problems.append(f"--guidance {s.guidance:g} is outside the range the model was checked at")
        if "sizes" in works and [s.height, s.width] not in works["sizes"]:
            problems.append(f"{s.height}x{s.width} is not a size the model was trained at")
        return problems[:1]  # one warning is enough to send the user to the card

    def _encode_text(self, prompts: list[str], long_prompts: str) -> np.ndarray:
        """-> (P, S, D) float32; with `chunk`, S is k x the encoder's length, k the most chunks any prompt needs."""
        encoder = self.engines["text_encoder"]
        if long_prompts == "truncate":
            return encoder.run({"input_ids": self.tokenizer(prompts).astype(np.int64)})["last_hidden_state"]
        chunks = [self.tokenizer.chunks(p) for p in prompts]  # (k_p, S) each
        k = max(len(c) for c in chunks)
        empty = self.tokenizer.chunks("")
        ids = np.concatenate([np.concatenate([c, *[empty] * (k - len(c))]) for c in chunks]).astype(np.int64)  # (P k, S)
        hidden = encoder.run({"input_ids": ids})["last_hidden_state"]  # (P k, S, D)
        return hidden.reshape(len(prompts), k * hidden.shape[1], hidden.shape[2])

    def generate(self, req: GenerateRequest, progress: bool = True) -> list[np.ndarray]:
        """-> num_images arrays (H, W, 3) uint8."""
        s = self.settings(req)
        scheduler = make_scheduler(s.scheduler, self.scheduler_config, karras_sigmas=s.karras)
        scheduler.set_timesteps(s.steps)
        for problem in self._outside_works(s):
            log.warning("%s; this model's card says it draws well with %s", problem, describe_works(self.works))
        if s.guidance > USEFUL_GUIDANCE:
            log.warning("--guidance %g is far above where guidance helps (about 1 .. %g): expect a saturated or flat image",
                        s.guidance, USEFUL_GUIDANCE)
        noise = make_batch_noise(req.noise, req.seed, req.batch_noise, req.num_images)
        n = req.num_images
        guided = s.guidance > 1.0
        f = self.info.vae_scale_factor
        check_fits(attention_bytes((s.height // f) * (s.width // f)), f"{s.height}x{s.width}")

        # text embeddings: (2n, S, D) = [negative x n, positive x n] with guidance, else (n, S, D)
        if guided:
            negative, positive = self._encode_text([req.negative_prompt, req.prompt], req.long_prompts)
            context = np.concatenate([np.repeat(negative[None], n, 0), np.repeat(positive[None], n, 0)])
        else:
            context = np.repeat(self._encode_text([req.prompt], req.long_prompts), n, 0)

        shape = (n, self.info.latent_channels, s.height // f, s.width // f)
        latents = noise.randn(shape) * np.float32(scheduler.init_noise_sigma)  # (n, C, h, w) float32
        unet = self.engines["unet"]
        guidance = np.float32(s.guidance)
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
        s = self.settings(req)
        manifest = self.manifest or {}
        return {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "steps": s.steps,
            "scheduler": s.scheduler,
            "karras_sigmas": s.karras,
            "guidance": s.guidance,
            "seed": req.seed,
            "image_index": index,
            "num_images": req.num_images,
            "noise": req.noise,
            "batch_noise": req.batch_noise,
            "long_prompts": req.long_prompts,
            "image_seed": req.seed + index if req.batch_noise == "per-image" else None,  # alone with --num-images 1, this seed
            "height": s.height,
            "width": s.width,
            "model_hash": model_hash(manifest) if manifest else None,
            "backend": manifest.get("backend", {}).get("name"),
            "precision": manifest.get("precision"),
        }
