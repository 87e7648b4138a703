"""One benchmark configuration, measured in the process that runs this module (the harness starts
a fresh one per configuration so that peak memory belongs to that configuration alone).

    python -m sdrt.benchmarks.measure '{"kind": "sdrt", "engines": ..., ...}'   -> one JSON line

Kinds: "sdrt" (an engine folder), "diffusers" (the baseline: the task's diffusers pipeline, PyTorch
eager fp32 or bf16), "openvino-genai" (OpenVINO GenAI's pipeline on an openvino engine folder), "gemm" (this machine's fp32 GEMM rate), "flops" (U-Net FLOPs per step, torch's counter).
Tasks: txt2img, img2img (strength 0.8), inpaint (the middle half masked, strength 1.0), depth (depth
estimated by the model's DPT), upscale (a quarter-size input), unclip: the inputs are the same picture
for sdrt and diffusers; the last three need a model of that kind (--model).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdrt.memory import peak_rss_mb, reset_peak

PROMPT = "a photograph of an astronaut riding a horse on the moon"
TASKS = ("txt2img", "img2img", "inpaint", "depth", "upscale", "unclip")
DIFFUSERS_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                       "inpaint": "StableDiffusionInpaintPipeline", "depth": "StableDiffusionDepth2ImgPipeline",
                       "upscale": "StableDiffusionUpscalePipeline", "unclip": "StableUnCLIPImg2ImgPipeline"}
UPSCALE = 4


def task_inputs(task: str, height: int, width: int) -> dict:
    """GenerateRequest fields of the task: a smooth picture of the output's size and, for inpainting, a mask."""
    from PIL import Image

    colours = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    picture = Image.fromarray(colours).resize((width, height), Image.Resampling.BICUBIC)
    if task in ("img2img", "depth"):
        return {"init_image": picture}
    if task == "upscale":
        return {"image": picture.resize((width // UPSCALE, height // UPSCALE), Image.Resampling.BICUBIC)}
    if task == "unclip":
        return {"image": picture}
    if task == "inpaint":
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        return {"image": picture, "mask": Image.fromarray(mask)}
    return {}


def _p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


class TimedEngine:
    def __init__(self, engine, seconds: list[float]):
        self.engine, self.seconds = engine, seconds

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        out = self.engine.run(feeds)
        self.seconds.append(time.perf_counter() - started)
        return out

    def close(self) -> None:
        self.engine.close()


def sdrt_request(a: dict):
    """The bench's request (its prompt, seed 0, guidance 7.5, steps, scheduler, size, task inputs) with a variant's
    `sdrt generate` options on top (a["generate_args"]); -> (request, those options parsed)."""
    import dataclasses

    from sdrt.cli import generate_request, parse_generate

    args = parse_generate([str(a["engines"]), "--prompt", PROMPT, "--output", "unused.png", "--seed", "0", "--guidance", "7.5",
                           "--steps", str(a["steps"]), "--scheduler", a["scheduler"], "--height", str(a["height"]),
                           "--width", str(a["width"]), *a.get("generate_args", ())])
    return dataclasses.replace(generate_request(args), **task_inputs(a["task"], a["height"], a["width"])), args


def measure_sdrt(a: dict) -> dict:
    """The default row (a["generate_args"] empty) also measures loads; a variant's row times generation only. Both
    save their last image (a["image_out"], .npy) for the harness's PSNR of each variant against its default."""
    from sdrt.components import ComponentSpec
    from sdrt.engines.base import LoadConfig, engine_class
    from sdrt.manifest import verify_files
    from sdrt.pipeline import TXT2IMG_COMPONENTS, StableDiffusion

    req, options = sdrt_request(a)
    folder = Path(a["engines"])
    loads = {}
    # the first load is cold (empty OpenVINO model cache), the rest warm: without hash checks, hashing
    # every file, and `changed` twice (the first hashes and records, the second trusts the record)
    for name, verify in (() if a.get("generate_args") else (("cold", "never"), ("never", "never"), ("always", "always"), ("changed-first", "changed"))):
        started = time.perf_counter()
        StableDiffusion.from_engine_folder(folder, threads=a["threads"], verify=verify).close()
        loads[name] = time.perf_counter() - started
    staged = reset_peak()  # False where the OS cannot: then only the whole run's peak is known
    started = time.perf_counter()
    pipe = StableDiffusion.from_engine_folder(folder, threads=a["threads"], verify="changed", low_memory=options.low_memory,
                                              vae_precision=options.vae_precision)
    loads["changed"] = time.perf_counter() - started
    stage_peaks = {"load": peak_rss_mb(), "denoise": 0.0, "decode": 0.0}  # denoise: text encoding and the loop
    seconds: dict[str, list[float]] = {}
    load_engine = pipe._load_engine
    pipe._load_engine = lambda name: TimedEngine(load_engine(name), seconds.setdefault(name, []))  # low memory loads as it goes
    pipe.engines = {name: TimedEngine(engine, seconds.setdefault(name, [])) for name, engine in pipe.engines.items()}

    def denoised(done: int, total: int, latents) -> bool:
        if done == total:
            stage_peaks["denoise"] = max(stage_peaks["denoise"], peak_rss_mb())
            reset_peak()
        return True

    for _ in range(a["warmup"]):
        pipe.generate(req, progress=False)
    e2e = []
    for times in seconds.values():
        times.clear()
    for _ in range(a["repeat"]):
        reset_peak()
        started = time.perf_counter()
        image = pipe.generate(req, progress=False, on_step=denoised)[0]
        e2e.append(time.perf_counter() - started)
        stage_peaks["decode"] = max(stage_peaks["decode"], peak_rss_mb())
    if a.get("image_out"):
        np.save(a["image_out"], image)
    pipe.close()
    row = {
        "text_encoder_s": statistics.median(seconds["text_encoder"]),
        "unet_step_s": statistics.median(seconds["unet"]), "unet_step_p90_s": _p90(seconds["unet"]),
        "vae_decode_s": statistics.median(seconds["vae_decoder"]), "e2e_s": statistics.median(e2e),
        "peak_rss_mb": max(stage_peaks.values()), "peak_rss_stage_mb": stage_peaks if staged else None,
    }
    if a.get("generate_args"):
        return {**row, "load_s": None}
    manifest = pipe.manifest
    backend = engine_class(manifest["backend"]["name"])
    cfg = LoadConfig(threads=a["threads"], precision=manifest["precision"])
    encoder = backend.load(folder / "vae_encoder", ComponentSpec.from_json(manifest["components"]["vae_encoder"]["spec"]), cfg)
    picture = np.random.default_rng(0).uniform(-1, 1, (1, 3, a["height"], a["width"])).astype(np.float32)
    encode = []
    for _ in range(1 + a["repeat"]):
        started = time.perf_counter()
        encoder.run({"sample": picture})
        encode.append(time.perf_counter() - started)
    encoder.close()
    # the warm load's parts, each alone: hashing the files it reads, then each engine's load (read and compile, or
    # read the model cache's blob); the rest of a load is the manifest, the tokenizer and the overlap of the two
    started = time.perf_counter()
    verify_files(folder, manifest, [p for name in TXT2IMG_COMPONENTS for p in backend.files_to_load(folder / name, cfg)])
    verify_s, engine_s = time.perf_counter() - started, {}
    for name in TXT2IMG_COMPONENTS:
        started = time.perf_counter()
        backend.load(folder / name, ComponentSpec.from_json(manifest["components"][name]["spec"]), cfg).close()
        engine_s[name] = time.perf_counter() - started
    return {
        **row,
        "load_s": loads["cold"], "load_warm_s": loads["never"], "load_warm_verify_always_s": loads["always"],
        "load_warm_verify_changed_s": loads["changed"], "load_verify_alone_s": verify_s, "load_engine_alone_s": engine_s,
        "vae_encode_s": statistics.median(encode[1:]),
    }


def measure_diffusers(a: dict) -> dict:
    import diffusers
    import torch

    from sdrt.schedulers import DIFFUSERS_CLASS_OF

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a["dtype"]]
    loads = []
    for _ in range(2):
        started = time.perf_counter()
        pipe = getattr(diffusers, DIFFUSERS_PIPELINES[a["task"]]).from_pretrained(a["model"], safety_checker=None, torch_dtype=dtype)
        loads.append(time.perf_counter() - started)
        if len(loads) == 1:
            del pipe
    pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[a["scheduler"]]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seconds = {"text_encoder": [], "unet": [], "vae_decoder": []}

    def timer(module, name):
        module.register_forward_pre_hook(lambda *_: seconds.setdefault("_start", {}).__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *_: seconds[name].append(time.perf_counter() - seconds["_start"][name]))

    timer(pipe.text_encoder, "text_encoder")
    timer(pipe.unet, "unet")
    timer(pipe.vae.decoder, "vae_decoder")

    inputs = task_inputs(a["task"], a["height"], a["width"])
    images = {"init_image": "image", "image": "image", "mask": "mask_image"}  # sdrt's request fields -> diffusers' arguments
    size = {"height": a["height"], "width": a["width"]} if a["task"] in ("txt2img", "inpaint", "unclip") else {}  # the others: the image's

    def run():
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=a["steps"], guidance_scale=7.5, generator=torch.Generator().manual_seed(0), **size,
                 **{images[k]: v for k, v in inputs.items()})

    for _ in range(a["warmup"]):
        run()
    for key in ("text_encoder", "unet", "vae_decoder"):
        seconds[key].clear()
    e2e = []
    for _ in range(a["repeat"]):
        started = time.perf_counter()
        run()
        e2e.append(time.perf_counter() - started)
    peak = peak_rss_mb()
    image = (torch.rand(1, 3, a["height"], a["width"]) * 2 - 1).to(dtype)
    encode = []
    with torch.inference_mode():
        for _ in range(1 + a["repeat"]):
            started = time.perf_counter()
            pipe.vae.encode(image)
            encode.append(time.perf_counter() - started)
    return {
        "load_s": loads[0], "load_warm_s": loads[1],
        "text_encoder_s": statistics.median(seconds["text_encoder"]),
        "unet_step_s": statistics.median(seconds["unet"]), "unet_step_p90_s": _p90(seconds["unet"]),
        "vae_decode_s": statistics.median(seconds["vae_decoder"]), "vae_encode_s": statistics.median(encode[1:]),
        "e2e_s": statistics.median(e2e), "peak_rss_mb": peak,
    }


GENAI_PIPELINES = {"txt2img": "Text2ImagePipeline", "img2img": "Image2ImagePipeline", "inpaint": "InpaintingPipeline"}


def measure_genai(a: dict) -> dict:
    """OpenVINO GenAI's C++ pipeline on an sdrt openvino engine folder: the same IR, threads, precision and
    model cache as sdrt's row, GenAI's loop (and, where GenAI cannot run the bench's scheduler as sdrt does, the one
    the folder's view falls back to: Euler)."""
    import openvino as ov
    import openvino_genai as g

    from sdrt.cpu import usable_cores
    from sdrt.engines.cache import cache_root
    from sdrt.engines.openvino_genai import genai_scheduler, genai_scheduler_object
    from sdrt.manifest import load_manifest

    folder = Path(a["engines"])
    manifest = load_manifest(folder, verify=False)
    record = manifest["openvino_genai"]
    properties = {**record["properties"], "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": a["threads"] or usable_cores(),
                  "CACHE_DIR": str(cache_root() / "openvino")}
    loads, pipe = [], None
    for _ in range(2):  # cold (GenAI's own entries in the model cache made), then warm
        del pipe
        started = time.perf_counter()
        pipe = getattr(g, GENAI_PIPELINES[a["task"]])(str(folder), "CPU", **properties)
        loads.append(time.perf_counter() - started)
    scheduler = genai_scheduler(a["scheduler"], manifest["scheduler_config"])
    pipe.set_scheduler(genai_scheduler_object(folder, scheduler))
    inputs = task_inputs(a["task"], a["height"], a["width"])
    images = [ov.Tensor(np.asarray(inputs[k].convert("RGB"))[None]) for k in ("init_image", "image", "mask") if k in inputs]  # (1, H, W, 3) uint8

    def run():
        pipe.generate(PROMPT, *images, width=a["width"], height=a["height"], num_inference_steps=a["steps"], guidance_scale=7.5,
                      generator=g.TorchGenerator(0), **({"strength": 0.8} if a["task"] == "img2img" else {}))
        return pipe.get_performance_metrics()

    for _ in range(a["warmup"]):
        run()
    e2e, unet, text, decode, encode = [], [], [], [], []
    for _ in range(a["repeat"]):
        started = time.perf_counter()
        metrics = run()
        e2e.append(time.perf_counter() - started)
        unet += [us / 1e6 for us in metrics.raw_metrics.unet_inference_durations]
        text.append(sum(metrics.get_text_encoder_infer_duration().values()) / 1e3)
        decode.append(metrics.get_vae_decoder_infer_duration() / 1e3)
        encode.append(metrics.get_vae_encoder_infer_duration() / 1e3)
    return {
        "load_s": loads[0], "load_warm_s": loads[1], "scheduler": scheduler,
        "text_encoder_s": statistics.median(text), "unet_step_s": statistics.median(unet), "unet_step_p90_s": _p90(unet),
        "vae_decode_s": statistics.median(decode), "vae_encode_s": statistics.median(encode) if images else None,
        "e2e_s": statistics.median(e2e), "peak_rss_mb": peak_rss_mb(),
    }


def measure_gemm(a: dict) -> dict:
    """fp32 GEMM GFLOP/s with the same thread count: the roofline the U-Net rows are held against."""
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    n = a.get("n", 2048)  # the rate of 4096 (94 vs 95 GFLOP/s on one core here) in a quarter of the time
    x, y = torch.randn(n, n), torch.randn(n, n)
    torch.mm(x, y)
    best = min(_timed(lambda: torch.mm(x, y)) for _ in range(3))
    return {"gemm_gflops": 2 * n**3 / best / 1e9, "n": n}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_flops(a: dict) -> dict:
    """FLOPs of one U-Net call at batch 2 (classifier-free guidance), counted by torch."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdrt.model_info import read_model_info

    info = read_model_info(Path(a["model"]))
    unet = UNet2DConditionModel.from_pretrained(a["model"], subfolder="unet", torch_dtype=torch.float32).eval()
    f = info.vae_scale_factor
    sample = torch.randn(2, info.latent_channels, a["height"] // f, a["width"] // f)
    context = torch.randn(2, info.text_max_length, info.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    labels = None  # the upscaler's noise levels, unCLIP's image embeddings
    if unet.config.num_class_embeds is not None:
        labels = torch.tensor([20, 20])
    elif unet.config.class_embed_type == "projection":
        labels = torch.zeros(2, unet.config.projection_class_embeddings_input_dim)
    with counter, torch.no_grad():
        unet(sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=context, class_labels=labels)
    return {"unet_gflop": counter.get_total_flops() / 1e9}


def main() -> None:
    args = json.loads(sys.argv[1])
    measure = {"sdrt": measure_sdrt, "diffusers": measure_diffusers, "openvino-genai": measure_genai, "gemm": measure_gemm,
               "flops": measure_flops}[args["kind"]]
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
