"""`sdrt build`: export a diffusers model folder to ONNX, build engines, check them, write the manifest.

Steps: export every component (cached by the model's content) -> fp32 reference sessions on the
exported graphs -> per component, the backend's artifacts (cached by ONNX bytes, spec, options and
backend version; int8 U-Nets calibrated on U-Net inputs recorded from reference runs) -> the
accuracy check against the reference (image PSNR, per-component errors), which fails the build
under --min-psnr -> manifest. The folder is assembled under a temporary name beside `out` and
renamed into place only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from sdrt.components import ComponentSpec, component_specs
from sdrt.cpu import cpu_description
from sdrt.engines.base import BuildConfig, LoadConfig, engine_class, static_spec
from sdrt.engines.cache import BuildCache, cache_key
from sdrt.errors import SdrtError
from sdrt.image_io import usual_mode
from sdrt.manifest import MANIFEST, file_sha256, hash_files, write_manifest
from sdrt.model_info import ModelInfo, read_json, read_model_info, scheduler_config_path
from sdrt.pipeline import TXT2IMG_COMPONENTS, StableDiffusion
from sdrt.tokenizer import TOKENIZER_FILES, CLIPTokenizer

from . import prompts

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-3  # max abs error of an fp32 graph against torch before the build fails
MODEL_EXTRAS = "sdrt.json"  # optional, in a model folder: recommended defaults and domain prompts


def _scheduler_config(model_dir: Path) -> dict:
    """The model's full scheduler config, defaults of its class filled in by diffusers itself."""
    import diffusers

    raw = read_json(scheduler_config_path(model_dir))
    cls = getattr(diffusers, raw.get("_class_name", ""), None)
    if cls is None:
        return raw
    return {"_class_name": raw["_class_name"], **{k: v for k, v in dict(cls.from_config(raw).config).items() if not k.startswith("_")}}


def _usual_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only entries; give the folder the umask's usual modes."""
    modes = {True: usual_mode(directory=True), False: usual_mode(directory=False)}
    for path in [root, *root.rglob("*")]:
        path.chmod(modes[path.is_dir()])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _export(model_dir: Path, info: ModelInfo, specs: dict[str, ComponentSpec], staging: Path, cache: BuildCache) -> tuple[dict, bool]:
    """ONNX graphs into staging/<component>/; -> ({component: max abs error vs torch}, cache hit)."""
    import torch

    from . import onnx_export

    sources = [p for sub in ("text_encoder", "unet", "vae") for p in sorted((model_dir / sub).rglob("*")) if p.is_file()]
    key = cache_key("export", files={p.relative_to(model_dir).as_posix(): file_sha256(p) for p in sources},
                    torch=torch.__version__, opset=onnx_export.OPSET, specs={k: v.to_json() for k, v in specs.items()})
    errors, hit = {}, True
    for name in specs:
        if cache.fetch(f"{key}-{name}", staging / name) is None:
            hit = False
            break
    if not hit:
        modules = onnx_export.load_modules(model_dir)
        for name, module in modules.items():
            log.info("exporting %s", name)
            shutil.rmtree(staging / name, ignore_errors=True)
            onnx_path = onnx_export.export_component(module, specs[name], onnx_export.trace_sizes(info), staging / name)
            error = onnx_export.check_export(onnx_path, module, specs[name], onnx_export.check_sizes(info))
            if error > EXPORT_TOLERANCE:
                raise SdrtError(f"exported {name} differs from torch by {error:.3g} (tolerance {EXPORT_TOLERANCE}); not building")
            (staging / name / "export.json").write_text(json.dumps({"max_abs_error": error}))
            cache.store(f"{key}-{name}", _files(staging / name))
    for name in specs:
        record = staging / name / "export.json"
        errors[name] = json.loads(record.read_text())["max_abs_error"]
        record.unlink()
    return errors, hit


def _reference(model_dir: Path, info: ModelInfo, scheduler_config: dict, specs: dict[str, ComponentSpec], staging: Path,
               threads: int) -> StableDiffusion:
    """fp32 ONNX Runtime sessions on the exported graphs: what every build is checked against."""
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    cfg = LoadConfig(threads=threads)
    engines = {name: OnnxRuntimeEngine.load_graph(staging / name / "model.onnx", specs[name], cfg) for name in specs}
    return StableDiffusion(info, scheduler_config, CLIPTokenizer(model_dir / "tokenizer"), engines)


def _static_sizes(cfg: BuildConfig, info: ModelInfo, component: str) -> dict[str, int] | None:
    if not cfg.static_shape:
        return None
    height, width = cfg.static_shape
    f = info.vae_scale_factor
    batch = {"text_encoder": 2, "unet": 2 * cfg.batch}.get(component, 1)  # [negative, positive]; CFG doubles the U-Net batch
    return {"batch": batch, "sequence": info.text_max_length, "latent_height": height // f, "latent_width": width // f,
            "height": height, "width": width}


def build_engines(model_dir: Path, out: Path, cfg: BuildConfig, overwrite: bool = False, cache: BuildCache | None = None) -> dict:
    if out.exists() and not overwrite:
        raise SdrtError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SdrtError(f"--out {out} is a folder that is not an sdrt engine folder; refusing to replace it, pick another --out")
    info = read_model_info(model_dir)
    extras = read_json(model_dir / MODEL_EXTRAS) if (model_dir / MODEL_EXTRAS).is_file() else {}
    engine = engine_class(cfg.backend)
    engine.check(cfg)
    for option, size in (("--static-shape", cfg.static_shape), ("--reference-size", cfg.reference_size)):
        if size and (size[0] <= 0 or size[1] <= 0 or size[0] % info.vae_scale_factor or size[1] % info.vae_scale_factor):
            raise SdrtError(f"{option} {size[0]}x{size[1]}: height and width must be positive multiples of {info.vae_scale_factor}")
    cache = cache or BuildCache(None)
    defaults = extras.get("defaults", {})
    reference_size = cfg.static_shape or cfg.reference_size or (defaults.get("height", info.default_height), defaults.get("width", info.default_width))
    specs = component_specs(info)
    scheduler_config = _scheduler_config(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    reference = None
    try:
        started = time.perf_counter()
        export_errors, export_hit = _export(model_dir, info, specs, staging, cache)
        exported_files = {name: _files(staging / name) for name in specs}
        exported = {p: file_sha256(p) for paths in exported_files.values() for p in paths}  # portable graphs: never rewritten
        onnx_hashes = {name: [exported[p] for p in paths] for name, paths in exported_files.items()}
        prompt_sets = extras.get("prompts", {})
        calibration_prompts = list(prompt_sets.get("calibration", prompts.CALIBRATION))[: cfg.calibration_prompts]
        calibration = None
        components, keys = {}, {}
        for name, spec in specs.items():
            needs_calibration = engine.needs_calibration(name, cfg)
            sizes = _static_sizes(cfg, info, name)
            key = cache_key("engine", component=name, backend=cfg.backend, version=engine.version(), options=cfg.cache_fields(),
                            spec=spec.to_json(), static=sizes, onnx=onnx_hashes if needs_calibration else onnx_hashes[name],
                            calibration_prompts=calibration_prompts if needs_calibration else None)
            keys[name] = key
            artifacts = cache.fetch(key, staging / name)
            hit = artifacts is not None
            if not hit:
                if needs_calibration and calibration is None:
                    reference = reference or _reference(model_dir, info, scheduler_config, specs, staging, cfg.threads)
                    log.info("recording U-Net inputs of %d prompts x %d steps at %dx%d for calibration", len(calibration_prompts),
                             cfg.calibration_steps, *reference_size)
                    from .accuracy import record_unet_inputs

                    calibration = record_unet_inputs(reference, calibration_prompts, cfg.calibration_steps, reference_size)
                log.info("building %s engine (%s, %s, %s)", name, cfg.backend, cfg.precision, cfg.device)
                artifacts = engine.build(staging / name / "model.onnx", spec, cfg, sizes, calibration if needs_calibration else None)
                cache.store(key, artifacts)
            components[name] = {"spec": (static_spec(spec, sizes) if sizes else spec).to_json(), "export_max_abs_error": export_errors[name],
                                "artifacts": [p.relative_to(staging).as_posix() for p in artifacts], "cache": "hit" if hit else "miss"}
        tok_dir = staging / "tokenizer"
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            if (model_dir / "tokenizer" / name).is_file():
                shutil.copy2(model_dir / "tokenizer" / name, tok_dir / name)

        accuracy = {"reference": True} if (cfg.backend, cfg.precision) == ("onnxruntime", "fp32") else None
        eval_prompts = list(prompt_sets.get("evaluation", prompts.EVALUATION))[: cfg.accuracy_prompts]
        compute = engine.compute_type(cfg.precision, cfg.device)
        accuracy_key = cache_key("accuracy", engines=keys, prompts=eval_prompts, steps=cfg.accuracy_steps, size=reference_size,
                                 batch=cfg.batch, device=cfg.device, compute=compute)
        with tempfile.TemporaryDirectory() as tmp:
            cached = cache.fetch(accuracy_key, Path(tmp)) if accuracy is None and cfg.accuracy_prompts else None
            if cached:
                accuracy = json.loads(cached[0].read_text())
        if accuracy is None and cfg.accuracy_prompts:
            from .accuracy import accuracy_report

            reference = reference or _reference(model_dir, info, scheduler_config, specs, staging, cfg.threads)
            load_cfg = LoadConfig(device=cfg.device, threads=cfg.threads, precision=cfg.precision)
            built = {name: engine.load(staging / name, ComponentSpec.from_json(components[name]["spec"]), load_cfg) for name in specs}
            candidate = StableDiffusion(info, scheduler_config, reference.tokenizer, {n: built[n] for n in TXT2IMG_COMPONENTS})
            log.info("checking accuracy against fp32 on %d prompts x %d steps at %dx%d", len(eval_prompts), cfg.accuracy_steps, *reference_size)
            accuracy = accuracy_report(reference, candidate, (reference.engines["vae_encoder"], built["vae_encoder"]), eval_prompts,
                                       cfg.accuracy_steps, reference_size, num_images=cfg.batch if cfg.static_shape else 1)
            for e in built.values():
                e.close()
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "accuracy.json").write_text(json.dumps(accuracy))
                cache.store(accuracy_key, [Path(tmp) / "accuracy.json"])
        if accuracy and not accuracy.get("reference"):
            if cfg.min_psnr is not None and accuracy["min_image_psnr_db"] < cfg.min_psnr:
                raise SdrtError(f"--min-psnr {cfg.min_psnr}: the {cfg.backend} {cfg.precision} engines reach {accuracy['min_image_psnr_db']:.1f} dB "
                                "against fp32; no engine folder was written")
        manifest = {
            "model": {"source": str(model_dir.resolve()), **info.to_json()},
            "scheduler_config": scheduler_config,
            "defaults": defaults,
            "backend": {"name": cfg.backend, "version": engine.version(), "device": cfg.device, "compute": compute},
            "precision": cfg.precision,
            "build_options": cfg.cache_fields(),
            "static_shape": {"height": cfg.static_shape[0], "width": cfg.static_shape[1], "batch": cfg.batch} if cfg.static_shape else None,
            "cpu": cpu_description(),
            "build_seconds": round(time.perf_counter() - started, 2),
            "export_cache": "hit" if export_hit else "miss",
            "components": components,
            "accuracy": accuracy,
            "files": hash_files(staging, [p for p in staging.rglob("*") if p.is_file()], known=exported),
        }
        write_manifest(staging, manifest)
        _usual_permissions(staging)
        previous = out.with_name(f".{out.name}.previous") if out.exists() else None
        if previous:
            out.rename(previous)
        staging.rename(out)
        if previous:
            shutil.rmtree(previous)
        return manifest
    finally:
        if reference:
            reference.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
