"""`sdrt` command line: argparse -> config objects -> calls. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from . import __version__
from .batch import FIELDS as BATCH_FIELDS
from .cpu import usable_threads
from .errors import SdrtError
from .files import remove_temporaries
from .noise import BATCH_NOISE, NOISE_KINDS


class _Parser(argparse.ArgumentParser):
    """argparse with errors as the rest of sdrt gives them: one line, exit status 2."""

    def error(self, message: str):
        print(f"sdrt: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _seed(value: str) -> int:
    """--seed: an integer, or -1 / random for a fresh random one (printed and recorded)."""
    if value.strip().lower() in ("-1", "random"):
        return secrets.randbelow(2**32)
    try:
        return int(value)
    except ValueError:
        raise SdrtError(f"--seed {value!r} is not a seed: give an integer 0 .. {2**32 - 1}, or -1 / random") from None


def _size(option: str, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        height, width = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise SdrtError(f"{option} {value!r} is not a size: write HEIGHTxWIDTH, e.g. 512x512") from None
    return height, width


def _names(option: str, value: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple of names."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise SdrtError(f"{option} is empty: give a comma-separated list")
    return items


def _build(args: argparse.Namespace) -> None:
    from .engines.base import BuildConfig
    from .engines.cache import BuildCache

    cfg = BuildConfig(
        backend=args.backend, precision=args.precision, device=args.device, threads=usable_threads("--threads", args.threads),
        static_shape=_size("--static-shape", args.static_shape), batch=args.batch, calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps, reference_size=_size("--reference-size", args.reference_size),
        int8_method=args.int8_method, smooth_quant_alpha=args.smooth_quant_alpha, int8_ignore=tuple(args.int8_ignore),
        accuracy_prompts=args.accuracy_prompts, accuracy_steps=args.accuracy_steps, min_psnr=args.min_psnr, cache_branch=args.cache_branch,
    )
    try:
        from .exporters.build import build_engines
        from .exporters.model_source import SourceOptions, parse_embedding, parse_lora
    except ImportError as exc:
        raise SdrtError(f"`sdrt build` needs the export extra (torch, diffusers, transformers, onnx): {exc.name} is not installed; "
                        "run `pip install torch==2.13.0` then `pip install 'sdrt[export]'`") from None
    source = SourceOptions(config=Path(args.config) if args.config else None, prediction_type=args.prediction_type, ema=args.ema,
                           loras=tuple(parse_lora(v) for v in args.lora), embeddings=tuple(parse_embedding(v) for v in args.embedding),
                           vae=Path(args.vae) if args.vae else None, vae_decoder=Path(args.vae_decoder) if args.vae_decoder else None)
    manifest = build_engines(Path(args.model), Path(args.out), cfg, overwrite=args.overwrite, cache=BuildCache(None, enabled=not args.no_cache),
                             source=source)
    errors = ", ".join(f"{k} {v['export_max_abs_error']:.2g}" for k, v in manifest["components"].items())
    print(f"built {args.out} ({cfg.backend} {manifest['backend']['version']}, {cfg.precision}, {cfg.device}) "
          f"in {manifest['build_seconds']} s{_build_peak(manifest)}; export max abs error vs torch: {errors}")
    accuracy = manifest["accuracy"]
    if accuracy and not accuracy.get("reference"):
        print(f"accuracy against fp32: image PSNR {accuracy['min_image_psnr_db']:.1f} dB (worst of {len(accuracy['image_psnr_db'])})")


def _build_peak(manifest: dict) -> str:
    """", peak memory 9.1 GB (unet)": the build's largest stage peak (what a machine needs to build these engines)."""
    peaks = {stage: record["peak_rss_mb"] for stage, record in (manifest.get("build_stages") or {}).items() if record.get("peak_rss_mb")}
    if not peaks:
        return ""
    stage = max(peaks, key=peaks.get)
    return f", peak memory {peaks[stage] / 1024:.1f} GB ({stage})"


def generate_request(args: argparse.Namespace):
    """`sdrt generate`'s options -> its GenerateRequest (the bench's variants are read the same way)."""
    from .depth import load_depth_map
    from .image_input import load_image
    from .pipeline import GenerateRequest

    images = {field: load_image(Path(getattr(args, field)), f"--{field.replace('_', '-')}")
              for field in ("init_image", "image", "mask") if getattr(args, field) is not None}
    if args.depth_map is not None:
        images["depth_map"] = load_depth_map(Path(args.depth_map))
    if args.prompt is None and (args.image is None or args.mask is not None):
        raise SdrtError("--prompt is required (only upscaling and unCLIP variations, given --image alone, can do without)")
    return GenerateRequest(
        prompt=args.prompt or "", negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=_seed(args.seed), scheduler=args.scheduler, karras=args.karras, height=args.height, width=args.width,
        num_images=args.num_images, noise=args.noise, batch_noise=args.batch_noise, long_prompts=args.long_prompts,
        strength=args.strength, mask_blur=args.mask_blur, noise_level=args.noise_level, tile=args.tile, watermark=args.watermark,
        guidance_cutoff=args.guidance_cutoff, cache_interval=args.cache_interval, **images,
    )


def parse_generate(argv: list[str]) -> argparse.Namespace:
    """`sdrt generate ARGV`'s options, checked as the command checks them; a refusal raises SdrtError."""
    with contextlib.redirect_stderr(io.StringIO()) as said:
        try:
            return _parser().parse_args(["generate", *argv])
        except SystemExit:
            pass
    raise SdrtError(said.getvalue().strip().removeprefix("sdrt: error: "))


def _generate(args: argparse.Namespace) -> None:
    from .image_io import check_writable, output_paths, save_png
    from .pipeline import StableDiffusion

    req = generate_request(args)
    if str(req.seed) != args.seed.strip():
        print(f"seed: {req.seed}", file=sys.stderr)
    paths = output_paths(Path(args.output), args.num_images)
    check_writable(paths, args.overwrite)
    pipe = StableDiffusion.from_engine_folder(Path(args.engines), device=args.device, threads=usable_threads("--threads", args.threads),
                                              verify=args.verify, low_memory=args.low_memory, vae_precision=args.vae_precision)
    try:
        images = pipe.generate(req, progress=not args.quiet)
        for index, (image, path) in enumerate(zip(images, paths)):
            save_png(image, path, pipe.metadata(req, index), overwrite=args.overwrite)
            print(path)
    finally:
        pipe.close()


def _generate_batch(args: argparse.Namespace) -> int:
    from . import batch
    from .cpu import threads_per_worker

    if args.workers < 1:
        raise SdrtError("--workers must be >= 1")
    threads = threads_per_worker("--threads", args.threads, args.workers)
    prompts, out = Path(args.prompts), Path(args.out)
    items = batch.read_items(prompts, _seed(args.seed))
    if args.ray:
        model_hash, results = batch.ray_results(Path(args.engines), prompts.parent, args.workers, threads, args.verify, args.ray_address)
    else:
        if args.workers != 1 or args.ray_address:
            raise SdrtError("--workers N > 1 and --ray-address need --ray (in one process the engines already use every core)")
        runner = batch.ItemRunner(args.engines, threads, args.verify)
        model_hash, results = runner.model_hash(), batch.local_results(runner, prompts.parent)
    batch.prepare_folder(out, prompts, model_hash)
    written, before, failures = batch.run_batch(items, out, results)
    print(f"{written} written, {before} already there, {len(failures)} failed" + (f" (see {out / batch.FAILURES})" if failures else ""))
    return 1 if failures else 0


def _json_object(option: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise SdrtError(f"{option} {text!r} is not a JSON object, e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'")
    return value


def _serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .serve.app import ServeConfig, create_app
    except ImportError as exc:
        raise SdrtError(f"`sdrt serve` needs the serve extra (FastAPI, uvicorn, prometheus-client): {exc.name} is not installed; "
                        "run `pip install 'sdrt[serve]'`") from None
    from .pipeline import StableDiffusion

    if args.max_queue < 0 or not 1 <= args.port <= 65535 or args.replicas < 1:
        raise SdrtError("--max-queue must be >= 0, --replicas >= 1 and --port 1 .. 65535")
    cfg = ServeConfig(api_key=args.api_key or os.environ.get("SDRT_API_KEY") or None, max_queue=args.max_queue, max_images=args.max_images,
                      max_steps=args.max_steps, max_pixels=args.max_pixels, timeout_s=args.timeout)
    if args.ray:
        from .cpu import threads_per_worker
        from .serve import ray_deployment

        threads = threads_per_worker("--threads", args.threads, args.replicas)
        ray_deployment.run(Path(args.engines), cfg, host=args.host, port=args.port, replicas=args.replicas,
                           autoscaling=_json_object("--autoscaling", args.autoscaling), threads=threads, verify=args.verify,
                           device=args.device, address=args.ray_address)
        return
    if args.replicas != 1 or args.autoscaling or args.ray_address:
        raise SdrtError("--replicas, --autoscaling and --ray-address need --ray")
    pipe = StableDiffusion.from_engine_folder(Path(args.engines), device=args.device, threads=usable_threads("--threads", args.threads),
                                              verify=args.verify)
    app = create_app(pipe, cfg)
    print(f"serving {args.engines} on http://{args.host}:{args.port}/ (WebUI API /sdapi/v1, OpenAI API /v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _grid(args: argparse.Namespace) -> None:
    from .grid import labelled_grid
    from .image_io import check_writable, save_png
    from .pipeline import GenerateRequest, StableDiffusion

    if args.seeds < 1 or args.scale < 1:
        raise SdrtError("--seeds and --scale must be >= 1")
    output = Path(args.output)
    check_writable([output], args.overwrite)
    pipe = StableDiffusion.from_engine_folder(Path(args.engines), threads=usable_threads("--threads", args.threads), verify=args.verify)
    try:
        requests = [[GenerateRequest(prompt=p, negative_prompt=args.negative_prompt, seed=s, steps=args.steps, guidance=args.guidance,
                                     scheduler=args.scheduler, karras=args.karras, height=args.height, width=args.width)
                     for s in range(args.seeds)] for p in args.prompt]
        rows = [[pipe.generate(req, progress=False)[0].repeat(args.scale, axis=0).repeat(args.scale, axis=1) for req in row] for row in requests]
        settings = pipe.settings(requests[0][0])
    finally:
        pipe.close()
    grid = labelled_grid(rows, args.prompt, [f"seed {s}" for s in range(args.seeds)])
    save_png(grid, output, {"prompts": args.prompt, "seeds": list(range(args.seeds)), "rows": "prompts", "columns": "seeds",
                            "negative_prompt": args.negative_prompt, **dataclasses.asdict(settings)}, overwrite=args.overwrite)
    print(output)


def _bench(args: argparse.Namespace) -> None:
    try:
        from .benchmarks.harness import BenchConfig, run
    except ImportError as exc:
        raise SdrtError(f"`sdrt bench` needs the export extra: {exc.name} is not installed") from None

    cfg = BenchConfig(model=args.model, out=Path(args.out), backends=_names("--backends", args.backends),
                      precisions=_names("--precisions", args.precisions), shapes=_names("--shapes", args.shapes), height=args.height, width=args.width, steps=args.steps,
                      scheduler=args.scheduler, tasks=_names("--tasks", args.tasks), repeat=args.repeat, warmup=args.warmup, threads=usable_threads("--threads", args.threads), baselines=() if args.baseline == "none" else _names("--baseline", args.baseline),
                      build_args=tuple(args.build_arg), variants=tuple(args.generate_arg))
    results = run(cfg)
    from .benchmarks.report import markdown

    print(markdown(results))


def _cache(args: argparse.Namespace) -> None:
    from .engines.cache import CACHE_KINDS, cache_root, cache_usage, clear_cache

    root = cache_root()
    if args.clear:
        kinds = list(CACHE_KINDS) if args.clear == "all" else list(_names("--clear", args.clear))
        if set(kinds) - set(CACHE_KINDS):
            raise SdrtError(f"--clear {args.clear!r}: accepted values are {', '.join(CACHE_KINDS)} (comma-separated) or all")
        print(f"deleted {clear_cache(root, kinds)} entries ({', '.join(kinds)}) from {root}")
        return
    usage = cache_usage(root)
    print(f"cache:       {root} (set SDRT_CACHE_DIR to move it)")
    for kind, u in usage.items():
        shared = f", {u['bytes_shared'] / 2**20:.0f} MiB of it also in engine folders" if u["bytes_shared"] else ""
        print(f"  {kind:<10} {u['entries']:>4} entries, {u['bytes'] / 2**20:10.1f} MiB{shared}")
    print("delete with `sdrt cache --clear KIND[,KIND]` or `--clear all`: engine folders keep working")


def _info(args: argparse.Namespace) -> None:
    from .manifest import engine_file, load_manifest, model_hash
    from .model_info import ModelInfo
    from .pipeline import BUILTIN_DEFAULTS, describe_works
    from .tasks import model_tasks
    from .schedulers import default_scheduler_name

    manifest = load_manifest(Path(args.engines), verify=not args.no_verify)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return
    model, backend = manifest["model"], manifest["backend"]
    print(f"engines:     {args.engines} (format {manifest['format_version']}, sdrt {manifest['sdrt_version']}, hash {model_hash(manifest)})")
    print(f"model:       {model['source']}")
    prepared = manifest.get("prepared") or {}
    if prepared.get("checkpoint"):
        c = prepared["checkpoint"]
        print(f"             a single file read as {c['read_as']} ({c['configs']}), {c['prediction_type']} prediction from {c['prediction_type_from']}, "
              f"U-Net weights: {c['unet_weights']}")
    for lora in prepared.get("loras", []):
        print(f"             LoRA {lora['name']} merged at weight {lora['weight']:g}")
    if prepared.get("vae"):
        print(f"             VAE replaced by {prepared['vae']['name']}")
    if prepared.get("vae_decoder"):
        print(f"             decoded by {prepared['vae_decoder']['name']} ({prepared['vae_decoder']['class']}), not the VAE")
    for emb in prepared.get("embeddings", []):
        print(f"             embedding {emb['name']} as the token {emb['token']} ({emb['vectors']} vector{'s' * (emb['vectors'] != 1)})")
    print(f"tasks:       {', '.join(model_tasks(ModelInfo.from_json({k: v for k, v in model.items() if k != 'source'})))}")
    print(f"             {model['prediction_type']} prediction, latents {model['latent_channels']} ch / VAE x{model['vae_scale_factor']}, "
          f"default {model['default_width']}x{model['default_height']}, text {model['text_max_length']} tokens x {model['text_hidden_size']}")
    defaults = {**BUILTIN_DEFAULTS, **manifest.get("defaults", {})}
    print(f"recommended: {defaults.get('width', model['default_width'])}x{defaults.get('height', model['default_height'])}, "
          f"{defaults['steps']} steps, guidance {defaults['guidance']:g}, scheduler "
          f"{defaults.get('scheduler') or default_scheduler_name(manifest['scheduler_config'])} (what `sdrt generate` uses unless told otherwise)")
    if manifest.get("works"):
        print(f"draws well:  {describe_works(manifest['works'])} (the model card's range; generate warns outside it)")
    print(f"scheduler:   {manifest['scheduler_config'].get('_class_name', '?')} "
          f"({manifest['scheduler_config'].get('timestep_spacing', '?')} spacing)")
    compute = f", float arithmetic in {backend['compute']}" if backend.get("compute") else ""
    print(f"backend:     {backend['name']} {backend['version']} on {backend['device']}, precision {manifest['precision']}{compute}")
    genai = manifest.get("openvino_genai")
    if genai and genai["loadable"]:
        properties = ", ".join(f"{k}={v}" for k, v in genai["properties"].items())
        print(f"embedding:   OpenVINO GenAI loads this folder ({genai['pipeline']}; its scheduler {genai['scheduler']} is sdrt's "
              f"{genai['sdrt_scheduler']}); create its pipelines with {properties} to compute as sdrt does")
    elif genai:
        print(f"embedding:   OpenVINO GenAI cannot load this folder: {genai['why']}")
    if (manifest.get("build_options") or {}).get("cache_branch") is not None:
        print(f"step cache:  branch {manifest['build_options']['cache_branch']} (`generate --cache-interval N` runs the whole U-Net "
              "every N steps, its shallow pass between)")
    if manifest.get("static_shape"):
        s = manifest["static_shape"]
        print(f"static:      {s['height']}x{s['width']}, {s['batch']} image(s) per prompt")
    if manifest.get("cpu"):
        cpu = manifest["cpu"]
        print(f"built on:    {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['features']) or 'no listed features'}")
    print(f"build:       {manifest['build_seconds']} s{_build_peak(manifest)}")
    accuracy = manifest.get("accuracy") or {}
    for name, comp in manifest["components"].items():
        line = f"  {name:<13} export max abs error vs torch {comp['export_max_abs_error']:.2e}"
        if name in accuracy.get("components", {}):
            a = accuracy["components"][name]
            line += f"; vs fp32 engine: max abs {a['max_abs_error']:.3g}, cosine {a['cosine_similarity']:.6f}"
        print(line)
    if accuracy.get("reference"):
        print("accuracy:    fp32 onnxruntime is the reference itself")
    elif accuracy:
        psnrs = ", ".join(f"{p:.1f}" for p in accuracy["image_psnr_db"])
        print(f"accuracy:    image PSNR vs fp32 {accuracy['min_image_psnr_db']:.1f} dB worst ({psnrs}) on {len(accuracy['prompts'])} prompts, "
              f"{accuracy['steps']} steps, {accuracy['width']}x{accuracy['height']}")
    else:
        print("accuracy:    not checked (--accuracy-prompts 0)")
    size = sum(engine_file(Path(args.engines), rel).stat().st_size for rel in manifest["files"])
    print(f"files:       {len(manifest['files'])}, {size / 2**20:.1f} MiB, hashes {'not checked' if args.no_verify else 'verified'}")


def _parser() -> argparse.ArgumentParser:
    from .engines.base import BACKENDS, PRECISIONS
    from .schedulers import SCHEDULERS

    parser = _Parser(prog="sdrt", description="Stable Diffusion inference runtime.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of builds; tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = _Parser(add_help=False)  # --verbose is also accepted after the command
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    b = sub.add_parser("build", parents=[verbose], help="export a model (diffusers folder or single-file checkpoint) and build engines")
    b.add_argument("model", help="diffusers model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or an "
                   "SD 1.x/2.x checkpoint file (.safetensors, .ckpt) in the original layout, its architecture detected")
    b.add_argument("--config", metavar="DIR", help="checkpoint file: the diffusers config folder of its architecture, instead of detecting it")
    b.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="checkpoint file: what its U-Net predicts, instead of detecting it")
    b.add_argument("--ema", action="store_true", help="checkpoint file holding both: its EMA U-Net weights instead of its training "
                   "weights (the default, as diffusers reads such files)")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge this LoRA (kohya/WebUI or diffusers/PEFT format) into the weights at WEIGHT (default 1.0); repeatable")
    b.add_argument("--vae", metavar="FILE|DIR", help="replace the model's VAE: a single file (original or diffusers layout) or a "
                   "diffusers VAE folder, e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    b.add_argument("--vae-decoder", metavar="DIR", help="decode with this tiny VAE instead (a diffusers AutoencoderTiny folder, e.g. "
                   "madebyollin/taesd for SD 1.x/2.x): several times faster and lighter, less detail; the VAE still encodes")
    b.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="add this textual-inversion embedding (WebUI .pt/.safetensors, diffusers learned_embeds) as TOKEN "
                   "(default: the file's name without suffix); repeatable")
    b.add_argument("--out", required=True, help="engine folder to create")
    b.add_argument("--backend", default="onnxruntime", help=f"one of {', '.join(BACKENDS)} (default onnxruntime)")
    b.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda or tensorrt (onnxruntime-gpu)")
    b.add_argument("--threads", type=int, default=0, help="threads for the build's optimisation session (0: all cores)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing engine folder")
    b.add_argument("--static-shape", metavar="HxW", help="openvino: engines for this image size only")
    b.add_argument("--batch", type=int, default=1, help="with --static-shape: images per prompt (default 1)")
    b.add_argument("--calibration-prompts", type=int, default=4, help="int8: prompts whose U-Net inputs calibrate it (default 4)")
    b.add_argument("--calibration-steps", type=int, default=10, help="int8: denoising steps recorded per prompt (default 10)")
    b.add_argument("--reference-size", metavar="HxW", help="image size of calibration and accuracy runs (default: the model's)")
    b.add_argument("--int8-method", default="static", help="onnxruntime int8: static (calibrated QDQ, default) or dynamic")
    b.add_argument("--smooth-quant-alpha", type=float, default=None, help="openvino int8: SmoothQuant strength (default off)")
    b.add_argument("--int8-ignore", action="append", default=[], metavar="REGEX", help="int8: keep in float the nodes whose whole name matches REGEX, e.g. '.*conv_in.*' (repeatable)")
    b.add_argument("--accuracy-prompts", type=int, default=2, help="prompts of the accuracy check against fp32 (0: skip; default 2)")
    b.add_argument("--accuracy-steps", type=int, default=10, help="denoising steps of the accuracy check (default 10)")
    b.add_argument("--min-psnr", type=float, default=None, metavar="DB", help="fail the build if the image PSNR against fp32 is lower")
    b.add_argument("--cache-branch", type=int, default=None, metavar="B", help="also export the U-Net for step caching (DeepCache; "
                   "`generate --cache-interval N`): B = 0 recomputes only the last layer between full passes (DeepCache's SD 1.5 "
                   "setting), higher B more of the U-Net's outer layers")
    b.add_argument("--no-cache", action="store_true", help="neither use nor fill the build cache ($SDRT_CACHE_DIR, default ~/.cache/sdrt)")
    b.add_argument("--quiet", action="store_true", help="no progress lines, only warnings and errors")
    b.set_defaults(func=_build)

    g = sub.add_parser("generate", parents=[verbose], help="generate images with built engines")
    g.add_argument("engines", help="engine folder made by `sdrt build`")
    g.add_argument("--prompt", default=None, help="what to draw (optional only with --image alone: upscaling and unCLIP variations)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=None, help="default: the model's recommendation, else 20")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, <= 1 disables it (default: the model's recommendation, else 7.5)")
    g.add_argument("--seed", default="0", help="integer 0 .. 2^32-1 (default 0); -1 or random: a random seed, printed and recorded")
    g.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)}, or a WebUI sampler name such as 'DPM++ 2M Karras', "
                   "'Euler a', 'PLMS' (default: the model's recommendation, else its own)")
    g.add_argument("--karras", action="store_true", help="Karras sigma spacing (dpmpp_2m, euler, lms)")
    g.add_argument("--height", type=int, default=None, help="default: the model's recommendation, else its sample size")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--noise", default="torch", choices=NOISE_KINDS, help="torch: same noise as torch.randn for a seed (default); cpp-std: as OpenVINO GenAI's "
                   "CppStdGenerator (std::mt19937, libstdc++), its default in C++")
    g.add_argument("--batch-noise", default="shared", choices=BATCH_NOISE,
                   help="shared: one generator for all --num-images (diffusers' way, default); per-image: image i uses seed + i "
                        "(the WebUI's way: each image can be made again alone)")
    g.add_argument("--long-prompts", default="truncate", help="truncate (default, as diffusers) or chunk: prompts past the text "
                   "encoder's length in chunks of 75 tokens, their embeddings concatenated (the WebUI's way)")
    g.add_argument("--init-image", metavar="FILE", help="img2img: start from this image (PNG, JPEG, WebP, ...); output size: "
                   "its size rounded down to the VAE factor unless --height/--width")
    g.add_argument("--image", metavar="FILE", help="inpainting: the image to repaint (with --mask); x4 upscaling and unCLIP variations: the input")
    g.add_argument("--mask", metavar="FILE", help="inpainting: white = repaint, black = keep; the size of --image")
    g.add_argument("--strength", type=float, default=None, help="img2img / inpainting: how far the image is noised, 0 < S <= 1 "
                   "(default 0.8 img2img, 1.0 inpainting, as diffusers); int(steps x S) steps run")
    g.add_argument("--mask-blur", type=float, default=0.0, metavar="RADIUS", help="inpainting: Gaussian blur of the mask first (default 0)")
    g.add_argument("--watermark", metavar="TEXT", help="embed TEXT invisibly (the invisible-watermark package's dwtDct method, "
                   "as Stable Diffusion's reference scripts do with SDV2; images of at least 256x256); default: none")
    g.add_argument("--tile", type=int, default=None, metavar="N", help="run the U-Net and VAE decoder on overlapping latent tiles of "
                   "at most NxN (0: never; default: 128 for x4 upscaling, else never)")
    g.add_argument("--cache-interval", type=int, default=1, metavar="N", help="step caching (DeepCache; engines built with "
                   "--cache-branch): the whole U-Net every N steps, its shallow pass from the kept feature between (default 1: every step whole)")
    g.add_argument("--guidance-cutoff", type=float, default=None, metavar="F", help="classifier-free guidance for the first F of the "
                   "steps only (0 .. 1; as diffusers' SDCFGCutoffCallback), then one U-Net pass per step instead of two; default: every step")
    g.add_argument("--noise-level", type=int, default=None, help="x4 upscaler: noise added to --image, 0 .. the model's max (default 20)")
    g.add_argument("--depth-map", metavar="FILE", help="depth to image: the depth of --init-image (greyscale, 8 or 16 bit, brighter = "
                   "nearer); default: estimated by the folder's depth estimator")
    g.add_argument("--output", required=True, help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--device", default=None, help="default: the device the engines were built for")
    g.add_argument("--threads", type=int, default=0, help="inference threads (0: all cores)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--verify", default="changed", help="always: hash every engine file loaded; changed (default): only files "
                   "changed since this user last verified them; never: trust the folder")
    g.add_argument("--vae-precision", default=None, metavar="fp32|bf16", help="the VAE decoder's compute type (openvino engines; bf16 "
                   "needs native bf16): default the build's")
    g.add_argument("--low-memory", action="store_true", help="one component in memory at a time (each loaded when needed, released "
                   "after), the U-Net on one guidance half at a time, the VAE decoded in tiles as diffusers' enable_tiling; "
                   "each image pays the loads")
    g.set_defaults(func=_generate)

    b = sub.add_parser("generate-batch", parents=[verbose], help="one image per line of a JSON Lines file; resumable; one "
                       "process or Ray workers")
    b.add_argument("engines", help="engine folder made by `sdrt build`")
    b.add_argument("prompts", help="JSON Lines: one object per line with prompt and any of "
                   + ", ".join(f for f in BATCH_FIELDS if f != "prompt") + " (files relative to this file's folder)")
    b.add_argument("--out", required=True, help="folder for NNNNN.png (line NNNNN), failures.jsonl and batch.json; run again to resume")
    b.add_argument("--seed", default="0", help="seed of line 1 for lines without one; line N gets SEED + N - 1 (default 0)")
    b.add_argument("--ray", action="store_true", help="run on Ray (the ray extra): a local instance, or --ray-address")
    b.add_argument("--ray-address", default=None, help="an existing Ray cluster (e.g. auto, or ray://host:10001)")
    b.add_argument("--workers", type=int, default=1, help="with --ray: pipelines working at once, each on --threads cores (default 1)")
    b.add_argument("--threads", type=int, default=0, help="threads per worker (0: the cores divided among the workers)")
    b.add_argument("--verify", default="changed", help="as for generate")
    b.set_defaults(func=_generate_batch)

    v = sub.add_parser("serve", parents=[verbose], help="serve an engine folder over HTTP: the WebUI's API and OpenAI's Images API")
    v.add_argument("engines", help="engine folder made by `sdrt build`")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=7860, help="default 7860, the WebUI's")
    v.add_argument("--api-key", default=None, help="required by every route but /health (Bearer, or HTTP Basic password); "
                   "default: $SDRT_API_KEY, else none")
    v.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond the running one; more get 429 (default 16)")
    v.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    v.add_argument("--max-steps", type=int, default=150, help="steps per request (default 150)")
    v.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width x height per image (default 1048576)")
    v.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop a generation running longer (504; default none)")
    v.add_argument("--device", default=None, help="default: the device the engines were built for")
    v.add_argument("--threads", type=int, default=0, help="inference threads (0: all cores)")
    v.add_argument("--verify", default="changed", help="always, changed (default) or never: as for generate")
    v.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (the ray extra): a local Ray instance, "
                   "or --ray-address")
    v.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, each with its pipeline on --threads cores (default 1)")
    v.add_argument("--autoscaling", metavar="JSON", help="with --ray: Ray Serve's autoscaling_config instead of --replicas, "
                   "e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    v.add_argument("--ray-address", default=None, help="with --ray: an existing Ray cluster (e.g. auto)")
    v.set_defaults(func=_serve)

    r = sub.add_parser("grid", parents=[verbose], help="one picture: a row per prompt, a column per seed (0, 1, ...)")
    r.add_argument("engines")
    r.add_argument("--prompt", action="append", required=True, help="repeat for more rows")
    r.add_argument("--seeds", type=int, default=4, help="columns: seeds 0 .. N-1 (default 4)")
    r.add_argument("--negative-prompt", default="")
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--guidance", type=float, default=None)
    r.add_argument("--scheduler", default=None, help="as for generate")
    r.add_argument("--karras", action="store_true")
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--scale", type=int, default=1, help="enlarge the grid by this integer factor (nearest neighbour)")
    r.add_argument("--output", required=True)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--verify", default="changed", help="as for generate")
    r.set_defaults(func=_grid)

    bn = sub.add_parser("bench", parents=[verbose], help="time backends x precisions against the diffusers baseline")
    bn.add_argument("--model", required=True, help="a model folder, or tiny / sd15 / sd21-base / sd21-v / sd-x4-upscaler (random weights, generated once)")
    bn.add_argument("--out", required=True, help="folder for results.json, report.md, report.png and the engines")
    bn.add_argument("--backends", default="onnxruntime", help="comma-separated (default onnxruntime)")
    bn.add_argument("--precisions", default="fp32", help="comma-separated (default fp32)")
    bn.add_argument("--shapes", default="dynamic", help="comma-separated: dynamic (default), static (engines built with "
                    "--static-shape HEIGHTxWIDTH)")
    bn.add_argument("--height", type=int, default=512)
    bn.add_argument("--width", type=int, default=512)
    bn.add_argument("--steps", type=int, default=20)
    bn.add_argument("--scheduler", default="dpmpp_2m")
    bn.add_argument("--tasks", default="txt2img", help="comma-separated: txt2img (default), img2img, inpaint, and with a model of "
                    "that kind depth, upscale, unclip; each timed against the matching diffusers pipeline")
    bn.add_argument("--repeat", type=int, default=1, help="timed generations per configuration (median reported)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed generations first")
    bn.add_argument("--threads", type=int, default=0, help="threads for every configuration and the baseline (0: all cores)")
    bn.add_argument("--baseline", default="diffusers",
                    help="diffusers (PyTorch eager fp32, default; speed-ups and memory ratios are against it), diffusers-bf16 "
                         "(eager bfloat16, a further row), openvino-genai (OpenVINO GenAI's C++ pipeline on each openvino "
                         "configuration's engines, a row after sdrt's), comma-separated; or none")
    bn.add_argument("--build-arg", action="append", default=[], help="extra argument for `sdrt build` (repeatable), e.g. --build-arg=--reference-size=256x256")
    bn.add_argument("--generate-arg", action="append", default=[], metavar="OPTIONS", help="a variant: `sdrt generate` options timed as "
                    "one more row after each configuration's, its image compared with that configuration's (repeatable), e.g. "
                    "--generate-arg='--guidance-cutoff 0.5' --generate-arg=--low-memory")
    bn.set_defaults(func=_bench)

    c = sub.add_parser("cache", parents=[verbose], help="show or clear the build cache and OpenVINO's model cache")
    c.add_argument("--clear", metavar="KINDS", help="exports, engines, accuracy, openvino, models (comma-separated) or all")
    c.set_defaults(func=_cache)

    i = sub.add_parser("info", parents=[verbose], help="describe an engine folder")
    i.add_argument("engines")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.add_argument("--no-verify", action="store_true", help="skip checking file hashes")
    i.set_defaults(func=_info)
    return parser


_handler_pid = os.getpid()  # the process that installed _stop (main() sets it)


def _stop(signum: int, frame) -> None:
    """Ctrl-C or SIGTERM: delete what this run was writing and end at once. (An exception raised here
    could land inside a native library's frame and abort the process instead.) A forked worker of some
    library inherits this handler: there it ends the worker as the signal would, touching nothing."""
    if os.getpid() != _handler_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    remove_temporaries()
    print("sdrt: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    global _handler_pid
    args = _parser().parse_args(argv)
    _handler_pid = os.getpid()
    previous = {stop: signal.signal(stop, _stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


class _Format(logging.Formatter):
    """Warnings as `sdrt: ...`; progress (info) with the seconds since the command started."""

    def format(self, record: logging.LogRecord) -> str:
        elapsed = f"[{record.relativeCreated / 1000:6.1f} s] " if record.levelno == logging.INFO else ""
        return f"sdrt: {elapsed}{record.getMessage()}"


def _run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(_Format())
    handler.addFilter(lambda record: args.verbose or record.name.startswith("sdrt"))  # other libraries' notes only with --verbose
    root, stages = logging.getLogger(), logging.getLogger("sdrt.exporters.build")
    levels = (root.level, stages.level)
    root.addHandler(handler)
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.command == "build" and not args.quiet:
        stages.setLevel(logging.INFO)  # a line per stage
    try:
        return _call(args)
    finally:  # as it was: main() may run inside another program (tests do)
        root.removeHandler(handler)
        root.setLevel(levels[0])
        stages.setLevel(levels[1])


def _call(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)
    except SdrtError as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`sdrt info --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug, not a user error: one line, the traceback with --verbose
        if args.verbose:
            raise
        print(f"sdrt: internal error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    return code or 0  # a command returns 1 when some of its work failed and the rest was done


if __name__ == "__main__":
    sys.exit(main())
