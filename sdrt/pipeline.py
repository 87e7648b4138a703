"""Every task's pipeline: tokenizer -> text encoder -> the task's start -> one scheduler loop over the
U-Net -> VAE decoder, in NumPy.

Follows diffusers' pipelines (StableDiffusionPipeline, ...Img2ImgPipeline, ...InpaintPipeline) step for
step (same noise stream, same classifier-free guidance batch order [negative, positive], same
post-processing), so that the same model, seed and scheduler give the same image. A task (sdrt/tasks/)
says only how the loop starts and what the U-Net gets besides the latents. The pipeline sees engines
only through `Engine.run`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .components import ComponentSpec
from .engines.base import Engine, LoadConfig, engine_class
from .errors import SdrtError
from .manifest import CONTENT_HASH, load_manifest, model_hash, verify_files
from .memory import attention_bytes, check_fits
from .model_info import ModelInfo
from .noise import make_batch_noise
from .schedulers import default_scheduler_name, make_scheduler, resolve_scheduler
from .schedulers.base import begin_index
from .tasks import TASKS, Start, Task, model_tasks, requested_task
from .tasks.base import guidance_embedding
from .tiling import OneAtATime, TiledEngine, VaeTiledDecoder
from .watermark import MIN_PIXELS as WATERMARK_MIN_PIXELS
from .watermark import embed as embed_watermark
from .watermark import text_bits
from .tokenizer import TOKENIZER_FILES, CLIPTokenizer
from .verified import VERIFY_MODES, VerifiedFiles

log = logging.getLogger(__name__)

TXT2IMG_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # loaded with the folder; the VAE encoder when a task first needs it
LOAD_ORDER = ("unet", "text_encoder", "vae_decoder")  # the largest first, so that the others load beside it
LOAD_THREADS = 2
VAE_COMPUTE_TYPES = {"fp32": "f32", "bf16": "bf16"}  # --vae-precision -> the compute type the backend must report for it
LONG_PROMPTS = ("truncate", "chunk")
TILE_MIN = 8  # latent pixels: smaller tiles see too little to draw anything
USEFUL_GUIDANCE = 30.0  # classifier-free guidance scales above this only saturate the image
BUILTIN_DEFAULTS = {"steps": 20, "guidance": 7.5}
DIFFUSERS_VAE_SAMPLE_SIZE = 512  # SD's VAE config value: the tile of engine folders built before sdrt recorded it
PREVIEW_LATENT_SIDE = 16  # previews decode at most 16x16 latents (128x128 pixels for SD): ~1/16 of a 512x512 decode


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
    init_image: Image.Image | None = None  # img2img: the image to start from (RGB)
    image: Image.Image | None = None  # inpainting: the image to repaint (RGB)
    mask: Image.Image | None = None  # inpainting: white = repaint, black = keep (same size as `image`)
    strength: float | None = None  # img2img / inpainting: how far the image is noised, (0, 1]; None: the task's default
    mask_blur: float = 0.0  # inpainting: Gaussian blur radius applied to the mask first (diffusers' VaeImageProcessor.blur)
    depth_map: np.ndarray | None = None  # depth to image: (H, W) depths, brighter = nearer; None: estimated by the folder's DPT engine
    noise_level: int | None = None  # x4 upscaler: noise on the low-resolution image (None: 20); unCLIP: on the image embedding (None: 0)
    tile: int | None = None  # U-Net and VAE decoder on latent tiles of at most tile x tile (0: never; None: the task's default)
    watermark: str | None = None  # text embedded invisibly as SD's reference scripts do (sdrt/watermark.py); None: none
    guidance_cutoff: float | None = None  # classifier-free guidance only up to this fraction of the steps (0 .. 1); None: all
    cache_interval: int = 1  # step caching: the whole U-Net every N steps, its shallow pass between (engines built with --cache-branch)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A request with every default resolved and checked."""

    steps: int
    guidance: float
    scheduler: str
    karras: bool
    height: int
    width: int
    task: str
    strength: float | None  # None for tasks without one (txt2img)
    tile: int | None  # latent tile side, None: untiled


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
        self.tasks = model_tasks(info)
        self._load_engine = None  # name -> Engine, verified before loading: components that only some tasks use
        self.low_memory = False  # one component open at a time, each loaded when needed (from_engine_folder's low_memory)
        self._tiny_decoder = False  # the folder decodes with an AutoencoderTiny (sdrt build --vae-decoder)
        self.vae_precision: str | None = None  # the VAE decoder's compute type when not the build's (from_engine_folder)
        self.cache_branch: int | None = None  # the folder's step-caching branch (sdrt build --cache-branch), None: no step caching

    def engine(self, name: str, keep: tuple[str, ...] = ()) -> Engine:
        """The component `name`, loaded if it is not open; in low-memory mode the others but `keep` are closed first."""
        if name not in self.engines:
            if self._load_engine is None:
                raise SdrtError(f"this pipeline has no {name} engine")
            if self.low_memory:
                self._release(keep)
            self.engines[name] = self._load_engine(name)
        return self.engines[name]

    def _release(self, keep: tuple[str, ...] = ()) -> None:
        """Low-memory mode: every open component but `keep` closed (the next is loaded when asked for)."""
        for name in [n for n in self.engines if n not in keep]:
            self.engines.pop(name).close()

    @classmethod
    def from_engine_folder(cls, engine_dir: Path, device: str | None = None, threads: int = 0, verify: str = "changed",
                           low_memory: bool = False, vae_precision: str | None = None) -> "StableDiffusion":
        """verify: always (hash every file it loads), changed (only those changed since this user last
        verified them: sdrt/verified.py), never (trust the folder; a warning says so). low_memory: the files are
        verified now, each component is opened when a generation needs it and closed once it has done its part, the
        U-Net runs one sample at a time (the guidance halves in turn), and the VAE decodes in tiles as diffusers' enable_tiling.
        vae_precision: the VAE decoder's compute type (fp32, bf16) where the backend picks it at load; None: the build's."""
        if verify not in VERIFY_MODES:
            raise SdrtError(f"--verify {verify!r} is not supported: accepted values are {', '.join(VERIFY_MODES)}")
        manifest = load_manifest(engine_dir, verify=False)
        backend = engine_class(manifest["backend"]["name"])
        cfg = LoadConfig(device=device or manifest["backend"]["device"], threads=threads, precision=manifest["precision"])
        if vae_precision is not None:
            if vae_precision not in VAE_COMPUTE_TYPES:
                raise SdrtError(f"--vae-precision {vae_precision!r} is not supported: accepted values are {', '.join(VAE_COMPUTE_TYPES)}")
            if backend.compute_type(vae_precision, cfg.device) != VAE_COMPUTE_TYPES[vae_precision]:
                raise SdrtError(f"--vae-precision {vae_precision} is not available with {manifest['backend']['name']} engines "
                                f"(they compute in {backend.compute_type(vae_precision, cfg.device)}); use openvino engines")
        if verify == "never":
            log.warning("--verify never: the hashes of %s's files are not checked", engine_dir)
        verified = VerifiedFiles(engine_dir, manifest[CONTENT_HASH]) if verify == "changed" else None

        def check(paths: list[Path]) -> None:
            if verify != "never":
                verify_files(engine_dir, manifest, list(dict.fromkeys(paths)), verified)

        def verify_component(name: str) -> None:
            """A component's files hashed: the build's artifacts for this device first (what the build made must be
            there: no silent fallback; a graph is parsed only once its bytes passed), then any other file it names."""
            if name not in manifest["components"]:
                raise SdrtError(f"{engine_dir} has no {name} engine; rebuild it with this version of sdrt")
            built = cfg.device == manifest["backend"]["device"]
            listed = [engine_dir / rel for rel in manifest["components"][name]["artifacts"]] if built else []
            check(listed)
            check([p for p in backend.files_to_load(engine_dir / name, cfg) if p not in listed])

        def open_engine(name: str) -> Engine:
            own = dataclasses.replace(cfg, precision=vae_precision) if vae_precision and name == "vae_decoder" else cfg
            return backend.load(engine_dir / name, ComponentSpec.from_json(manifest["components"][name]["spec"]), own)

        def load(name: str) -> Engine:
            """A component the task needs later (VAE encoder, depth estimator, ...): verified, then loaded."""
            verify_component(name)
            return open_engine(name)

        check([engine_dir / "tokenizer" / n for n in TOKENIZER_FILES if os.path.lexists(engine_dir / "tokenizer" / n)])
        # two components at a time, each verified then opened (none before its own check passed): the U-Net's
        # hashing or weight preparation runs beside the smaller components' and the tokenizer's parsing (the
        # backends and hashlib release the GIL there)
        loader = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="sdrt-load")
        try:
            loading = {name: loader.submit(verify_component if low_memory else load, name) for name in LOAD_ORDER}
            tokenizer = CLIPTokenizer(engine_dir / "tokenizer")
            engines = {name: loading[name].result() for name in TXT2IMG_COMPONENTS}
        finally:
            loader.shutdown(wait=False, cancel_futures=True)  # after a failed check, what has not started is not
        info = ModelInfo.from_json({k: v for k, v in manifest["model"].items() if k != "source"})
        pipe = cls(info, manifest["scheduler_config"], tokenizer, {} if low_memory else engines, manifest.get("defaults"),
                   manifest.get("static_shape"))
        pipe.manifest = manifest
        pipe.works = manifest.get("works")
        pipe._load_engine = load
        pipe.low_memory = low_memory
        pipe.vae_precision = vae_precision
        pipe._tiny_decoder = bool((manifest.get("prepared") or {}).get("vae_decoder"))
        pipe.cache_branch = (manifest.get("build_options") or {}).get("cache_branch")
        return pipe

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def task(self, req: GenerateRequest) -> Task:
        return requested_task(req, self.tasks)

    def settings(self, req: GenerateRequest) -> Settings:
        d = {**BUILTIN_DEFAULTS, **self.defaults}
        task = self.task(req)
        scheduler, karras = resolve_scheduler(req.scheduler or d.get("scheduler") or default_scheduler_name(self.scheduler_config), req.karras)
        size = task.default_size(req, self.info.vae_scale_factor) or (d.get("height", self.info.default_height), d.get("width", self.info.default_width))
        s = Settings(
            steps=d["steps"] if req.steps is None else req.steps,
            guidance=d["guidance"] if req.guidance is None else req.guidance,
            scheduler=scheduler,
            karras=karras,
            height=size[0] if req.height is None else req.height,
            width=size[1] if req.width is None else req.width,
            task=task.name,
            strength=task.default_strength if req.strength is None else req.strength,
            tile=(task.default_tile if req.tile is None else req.tile) or None,
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
        if s.strength is not None:
            begin_index(s.steps, s.strength)
        if req.guidance_cutoff is not None:
            if not 0 <= req.guidance_cutoff <= 1:
                raise SdrtError(f"--guidance-cutoff {req.guidance_cutoff} is not accepted: a fraction of the steps, 0 .. 1")
            if self.static_shape:
                raise SdrtError("--guidance-cutoff needs engines with a dynamic batch; these were built with --static-shape")
        if req.cache_interval < 1:
            raise SdrtError(f"--cache-interval {req.cache_interval} is not accepted: 1 (every step whole) or more")
        if req.cache_interval > 1 and self.cache_branch is None:
            raise SdrtError("--cache-interval needs engines built for step caching: rebuild with `sdrt build --cache-branch 0`")
        if req.cache_interval > 1 and s.tile:
            raise SdrtError("--cache-interval does not combine with --tile: the tiles would need a cached feature each")
        if req.tile is not None and (req.tile < 0 or 0 < req.tile < TILE_MIN):
            raise SdrtError(f"--tile {req.tile} is not accepted: 0 (no tiling) or at least {TILE_MIN} latent pixels")
        if req.watermark is not None:
            text_bits(req.watermark)
            if s.height * s.width < WATERMARK_MIN_PIXELS:
                raise SdrtError(f"--watermark needs images of at least 256x256 pixels (the dwtDct method's minimum); this one is {s.width}x{s.height}")
        if s.tile and self.static_shape:
            raise SdrtError("--tile needs engines with dynamic shapes; these were built with --static-shape (pass --tile 0)")
        task.check(req, s, self.info)
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
        encoder = self.engine("text_encoder")
        if long_prompts == "truncate":
            return encoder.run({"input_ids": self.tokenizer(prompts).astype(np.int64)})["last_hidden_state"]
        chunks = [self.tokenizer.chunks(p) for p in prompts]  # (k_p, S) each
        k = max(len(c) for c in chunks)
        empty = self.tokenizer.chunks("")
        ids = np.concatenate([np.concatenate([c, *[empty] * (k - len(c))]) for c in chunks]).astype(np.int64)  # (P k, S)
        hidden = encoder.run({"input_ids": ids})["last_hidden_state"]  # (P k, S, D)
        return hidden.reshape(len(prompts), k * hidden.shape[1], hidden.shape[2])

    def generate(self, req: GenerateRequest, progress: bool = True,
                 on_step: Callable[[int, int, np.ndarray], bool] | None = None) -> list[np.ndarray]:
        """-> num_images arrays (H, W, 3) uint8. on_step(steps done, steps to run, latents (n, C, h, w)) after every
        step; returning False stops the loop there and the latents reached are decoded (an interrupt)."""
        s = self.settings(req)
        scheduler = make_scheduler(s.scheduler, self.scheduler_config, karras_sigmas=s.karras)
        scheduler.set_timesteps(s.steps, 1.0 if s.strength is None else s.strength)
        for problem in self._outside_works(s):
            log.warning("%s; this model's card says it draws well with %s", problem, describe_works(self.works))
        if s.guidance > USEFUL_GUIDANCE:
            log.warning("--guidance %g is far above where guidance helps (about 1 .. %g): expect a saturated or flat image",
                        s.guidance, USEFUL_GUIDANCE)
        noise = make_batch_noise(req.noise, req.seed, req.batch_noise, req.num_images)
        n = req.num_images
        f = self.info.vae_scale_factor
        h, w = s.height // f, s.width // f
        check_fits(attention_bytes(min(h, s.tile or h) * min(w, s.tile or w)), f"{s.height}x{s.width}" + (f" in tiles of {s.tile}" if s.tile else ""))

        # text embeddings: (2n, S, D) = [negative x n, positive x n] with guidance, else (n, S, D); LCM-distilled
        # U-Nets take the guidance scale as an input (timestep_cond) instead of a second, unconditional half
        embed_dim = self.info.guidance_embed_dim
        if s.guidance > 1.0 and not embed_dim:
            negative, positive = self._encode_text([req.negative_prompt, req.prompt], req.long_prompts)
            context = np.concatenate([np.repeat(negative[None], n, 0), np.repeat(positive[None], n, 0)])
        else:
            context = np.repeat(self._encode_text([req.prompt], req.long_prompts), n, 0)
        start = self.task(req).start(self, req, s, scheduler, noise)
        if embed_dim:
            start = dataclasses.replace(start, unet_feeds={**start.unet_feeds, "timestep_cond": guidance_embedding(s.guidance, embed_dim, n)})
        unet = self.engine("unet")
        if s.tile:
            unet = TiledEngine(unet, "sample", "out_sample", s.tile, s.tile // 4)
        shallow = self.engine("unet_shallow", keep=("unet",)) if req.cache_interval > 1 else None
        if self.low_memory and not self.static_shape:
            unet, shallow = OneAtATime(unet), OneAtATime(shallow) if shallow else None  # the guidance halves in turn
        latents = self._denoise(start, scheduler, unet, context, np.float32(s.guidance), noise, progress, on_step, req.guidance_cutoff,
                                (shallow, req.cache_interval))
        decoder = self.engine("vae_decoder")
        if s.tile:
            decoder = TiledEngine(decoder, "latent_sample", "sample", s.tile, s.tile // 4, scale=f)
        elif self.low_memory and not self.static_shape and not self._tiny_decoder:  # a tiny decoder is light whole
            decoder = VaeTiledDecoder(decoder, self.info.vae_sample_size or DIFFUSERS_VAE_SAMPLE_SIZE, f)
        try:
            images = self._decode(latents, decoder)
        finally:
            if self.low_memory:
                self._release()
        return [embed_watermark(image, req.watermark) for image in images] if req.watermark is not None else images

    def _denoise(self, start: Start, scheduler, unet: Engine, context: np.ndarray, guidance: np.float32, noise, progress: bool,
                 on_step: Callable[[int, int, np.ndarray], bool] | None = None, guidance_cutoff: float | None = None,
                 step_cache: tuple[Engine | None, int] = (None, 1)) -> np.ndarray:
        """The loop every task shares: classifier-free guidance (cut off after a fraction of the steps if asked), step
        caching (step_cache: the U-Net's shallow pass and N: the whole U-Net on every N-th step from the first, the
        shallow pass from its kept feature between, as DeepCache's uniform schedule), the scheduler's steps from its
        begin index, progress and cancellation. context: (2n, S, D) with guidance > 1, else (n, S, D) -> latents
        (n, C, h, w) float32."""
        shallow, interval = step_cache
        kept = None  # (b, F, h, w): the deep feature of the last whole pass
        latents, extra, feeds = start.latents, start.unet_extra, dict(start.unet_feeds)
        n = latents.shape[0]
        guided = context.shape[0] == 2 * n
        conditional = (context[n:], extra, feeds)  # what the U-Net gets once guidance is cut off
        if guided:  # the unconditional and conditional halves see the same image channels and labels
            extra = None if extra is None else np.concatenate([extra, extra])  # (2n, c, h, w)
            unconditional = start.unconditional_feeds or feeds
            feeds = {name: np.concatenate([unconditional[name], value]) for name, value in feeds.items()}
        steps = range(scheduler.begin, len(scheduler.timesteps))
        # guidance cutoff as diffusers' SDCFGCutoffCallback: the step numbered int(steps x F) is the last guided one
        last_guided = scheduler.begin + int(len(steps) * guidance_cutoff) if guidance_cutoff is not None else len(scheduler.timesteps)
        for i in tqdm(steps, desc="denoising", unit="step", disable=None if progress else True, leave=False):
            if guided and i > last_guided:  # the conditional half alone from here: one U-Net pass of batch n
                guided = False
                context, extra, feeds = conditional
                kept = None if kept is None else kept[n:]
            model_input = np.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, i)
            if extra is not None:
                model_input = np.concatenate([model_input, extra], axis=1)  # (b, C + c, h, w)
            timestep = np.full((model_input.shape[0],), scheduler.timesteps[i], dtype=np.float32)
            step_feeds = {"sample": model_input, "timestep": timestep, "encoder_hidden_states": context, **feeds}
            if shallow is not None and kept is not None and (i - scheduler.begin) % interval:
                out = shallow.run({**step_feeds, "deep_feature": kept})["out_sample"]
            else:
                result = unet.run(step_feeds)
                out, kept = result["out_sample"], result.get("deep_feature")
            if guided:
                uncond, cond = out[:n], out[n:]
                out = uncond + guidance * (cond - uncond)
            step_noise = noise.randn(latents.shape) if scheduler.needs_noise else None
            latents = scheduler.step(out, i, latents, step_noise)
            if start.after_step is not None:
                latents = start.after_step(latents, i)
            if on_step is not None and on_step(i - scheduler.begin + 1, len(steps), latents) is False:
                break
        if not np.isfinite(latents).all():
            raise SdrtError("the denoising loop produced NaN or infinite latents; the engines are numerically broken for this model and precision")
        return latents

    def _decode(self, latents: np.ndarray, decoder: Engine) -> list[np.ndarray]:
        """(n, C, h, w) -> n images (H, W, 3) uint8, decoded one at a time."""
        images = []
        scaled = latents / np.float32(self.info.scaling_factor)
        for k in range(len(latents)):
            image = decoder.run({"latent_sample": scaled[k : k + 1]})["sample"][0]  # (3, H, W) in [-1, 1]
            image = np.clip(image / np.float32(2) + np.float32(0.5), 0, 1).transpose(1, 2, 0)
            images.append((image * 255).round().astype(np.uint8))
        return images

    def preview(self, latents: np.ndarray, max_side: int = PREVIEW_LATENT_SIDE) -> np.ndarray | None:
        """latents (n, C, h, w) of a running generation -> its first image, small: the latents averaged over k x k
        blocks (k: the least that brings both sides to <= max_side, at most the shorter side) and decoded by the VAE
        decoder itself. At k = 1 it is the image those latents make. None for static-shape engines (they decode one
        size only) and in low-memory mode."""
        if self.static_shape or self.low_memory:  # low memory: the U-Net is open, the decoder is not
            return None
        h, w = latents.shape[2:]
        k = max(1, min(-(-max(h, w) // max_side), h, w))
        first = latents[:1, :, : h - h % k, : w - w % k]
        if k > 1:
            first = first.reshape(1, first.shape[1], first.shape[2] // k, k, first.shape[3] // k, k).mean(axis=(3, 5))
        return self._decode(first, self.engines["vae_decoder"])[0]

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
            "task": s.task,
            "strength": s.strength,
            "mask_blur": req.mask_blur if s.task == "inpaint" else None,
            "noise_level": TASKS[s.task].noise_level(req) if "noise_level" in TASKS[s.task].takes else None,
            "tile": s.tile,
            "watermark": req.watermark,
            "guidance_cutoff": req.guidance_cutoff,
            "cache_interval": req.cache_interval,
            "low_memory": self.low_memory,
            "vae_precision": self.vae_precision,  # None: the build's
            "model_hash": model_hash(manifest) if manifest else None,
            "model": Path(manifest["model"]["source"]).stem if manifest else None,
            "loras": [{"name": lora["name"], "weight": lora["weight"]} for lora in (manifest.get("prepared") or {}).get("loras", [])],
            "vae": ((manifest.get("prepared") or {}).get("vae") or {}).get("name"),
            "vae_decoder": ((manifest.get("prepared") or {}).get("vae_decoder") or {}).get("name"),
            "backend": manifest.get("backend", {}).get("name"),
            "precision": manifest.get("precision"),
        }
