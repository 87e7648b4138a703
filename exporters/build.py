"""`sdrt build`: export a diffusers model folder to ONNX, build engines, check them, write the manifest.

Steps: export every component (cached by the model's content) -> fp32 reference sessions on the
exported graphs -> per component, the backend's artifacts (cached by ONNX bytes, spec, options and
backend version; int8 U-Nets calibrated on U-Net inputs recorded from reference runs) -> the
accuracy check against the reference (image PSNR, per-component errors), which fails the build
under --min-psnr -> manifest. The folder is assembled under a temporary name beside `out` (locked
while the build lives, so that a later build can delete what a killed one left) and renamed into
place only when everything succeeded; what is at `out` by then is replaced only with --overwrite and
only if it is an sdrt engine folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from sdrt.components import ComponentSpec, cache_branches, component_specs
from sdrt.cpu import cpu_description
from sdrt.engines.base import BuildConfig, LoadConfig, engine_class, static_spec
from sdrt.engines.cache import BuildCache, cache_key
from sdrt.errors import SdrtError, first_line
from sdrt.files import hold, locked, remove_leftovers, temporary_folder, untrack
from sdrt.image_io import usual_mode
from sdrt.manifest import MANIFEST, file_sha256, hash_files, write_manifest
from sdrt.memory import Stages, give_back_freed
from sdrt.model_info import ModelInfo, read_json, read_model_info, scheduler_config_path
from sdrt.pipeline import StableDiffusion
from sdrt.schedulers import DIFFUSERS_CLASS_NAMES, default_scheduler_name, make_scheduler, resolve_scheduler
from sdrt.tasks import model_tasks
from sdrt.tokenizer import TOKENIZER_FILES, CLIPTokenizer

from . import prompts
from .model_source import SourceOptions, needs_preparing, prepare_model

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-3  # max abs error of an fp32 graph against torch before the build fails
MODEL_EXTRAS = "sdrt.json"
WEIGHT_FOLDERS = ("text_encoder", "unet", "vae", "vae_decoder", "depth_estimator", "image_encoder", "image_normalizer")  # those a model has are read  # optional, in a model folder: recommended defaults and domain prompts


def _scheduler_config(model_dir: Path) -> dict:
    """The model's full scheduler config, defaults of its class filled in by diffusers itself, checked
    by sdrt's own scheduler so that a bad value fails the build rather than a later generate."""
    import diffusers

    path = scheduler_config_path(model_dir)
    config = read_json(path)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is not None:
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise SdrtError(f"{path}: _class_name {config['_class_name']!r} is not a scheduler class; "
                            f"accepted values are diffusers scheduler classes, e.g. {', '.join(DIFFUSERS_CLASS_NAMES)}")
        try:
            filled = dict(cls.from_config(config).config)
        except (TypeError, ValueError, KeyError) as exc:
            raise SdrtError(f"{path}: diffusers' {config['_class_name']} refuses this config: {first_line(exc)}") from None
        config = {"_class_name": config["_class_name"], **{k: v for k, v in filled.items() if not k.startswith("_")}}
    try:
        make_scheduler(default_scheduler_name(config), config).set_timesteps(2)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SdrtError(f"{path}: a value has the wrong type or range ({first_line(exc)})") from None
    return config


def _usual_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only entries; give the folder the umask's usual modes."""
    modes = {True: usual_mode(directory=True), False: usual_mode(directory=False)}
    for path in [root, *root.rglob("*")]:
        path.chmod(modes[path.is_dir()])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _export(model_dir: Path, info: ModelInfo, specs: dict[str, ComponentSpec], staging: Path,
            cache: BuildCache, cache_branch: int | None = None) -> tuple[dict, bool, dict[Path, str]]:
    """ONNX graphs into staging/<component>/; -> ({component: max abs error vs torch}, cache hit, {file: sha256})."""
    import torch

    from . import onnx_export

    sources = [p for sub in WEIGHT_FOLDERS for p in sorted((model_dir / sub).rglob("*")) if p.is_file()]
    key = cache_key("export", files={p.relative_to(model_dir).as_posix(): file_sha256(p) for p in sources},
                    torch=torch.__version__, opset=onnx_export.OPSET, specs={k: v.to_json() for k, v in specs.items()},
                    **({"cache_branch": cache_branch} if cache_branch is not None else {}))  # the spec does not say which
    errors, hit, hashes = {}, True, {}
    for name in specs:
        placed = cache.fetch(f"{key}-{name}", staging / name)
        if placed is None:
            hit = False
            break
        hashes.update(placed)
    if hit:
        log.info("export: the build cache has it (%s)", ", ".join(specs))
    else:
        log.info("loading the model's weights")
        modules = _load_modules(model_dir, tuple(specs), cache_branch)
        for name, module in modules.items():
            log.info("exporting %s", name)
            shutil.rmtree(staging / name, ignore_errors=True)
            onnx_path = onnx_export.export_component(module, specs[name], onnx_export.trace_sizes(info), staging / name)
            error = onnx_export.check_export(onnx_path, module, specs[name], onnx_export.check_sizes(info))
            if error > EXPORT_TOLERANCE:
                raise SdrtError(f"exported {name} differs from torch by {error:.3g} (tolerance {EXPORT_TOLERANCE}); not building")
            (staging / name / "export.json").write_text(json.dumps({"max_abs_error": error}))
            hashes.update(cache.store(f"{key}-{name}", _files(staging / name)))
    for name in specs:
        record = staging / name / "export.json"
        errors[name] = json.loads(record.read_text())["max_abs_error"]
        record.unlink()
    return errors, hit, {p: h for p, h in hashes.items() if p.exists()}


def _image_normalizer(model_dir: Path) -> dict:
    """unCLIP's image-embedding mean and std, read with diffusers: small enough for the manifest."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    _quiet_model_libraries()
    try:
        normalizer = StableUnCLIPImageNormalizer.from_pretrained(model_dir / "image_normalizer")
    except (OSError, ValueError, RuntimeError) as exc:
        raise SdrtError(f"{model_dir / 'image_normalizer'}: the image normalizer could not be loaded: {first_line(exc)}") from None
    return {"mean": normalizer.mean.detach().reshape(-1).tolist(), "std": normalizer.std.detach().reshape(-1).tolist()}


def _quiet_model_libraries() -> None:
    """diffusers' and transformers' loader notes (install accelerate, ...) are not for sdrt's users; what
    stops the build is raised and reported by sdrt."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity(logging.CRITICAL)
        library.utils.logging.disable_progress_bar()


def _load_modules(model_dir: Path, names: tuple[str, ...], cache_branch: int | None = None) -> dict:
    """The torch modules, with weights the loaders can read safely, or one clear error."""
    import pickle

    from . import onnx_export

    _quiet_model_libraries()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return onnx_export.load_modules(model_dir, names, cache_branch)
    except (OSError, pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        pickles = sorted(p.relative_to(model_dir).as_posix() for sub in WEIGHT_FOLDERS for p in (model_dir / sub).glob("*.bin"))
        if pickles:
            raise SdrtError(f"{model_dir}: the weights in {', '.join(pickles)} are a pickle that torch's safe loader (weights_only) refuses; "
                            "sdrt never runs code from a model file: convert it to .safetensors with a tool you trust") from None
        raise SdrtError(f"{model_dir}: the weights could not be loaded: {first_line(exc)}") from None


@contextlib.contextmanager
def _reference(model_dir: Path, info: ModelInfo, scheduler_config: dict, specs: dict[str, ComponentSpec], staging: Path,
               threads: int) -> Iterator[StableDiffusion]:
    """fp32 ONNX Runtime sessions on the exported graphs: what every build is checked against. Open only while used:
    closed on leaving and their memory given back, so that quantization and the candidate never sit beside them."""
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    cfg = LoadConfig(threads=threads)
    engines = {name: OnnxRuntimeEngine.load_graph(staging / name / "model.onnx", specs[name], cfg) for name in specs}
    reference = StableDiffusion(info, scheduler_config, CLIPTokenizer(model_dir / "tokenizer"), engines)
    try:
        yield reference
    finally:
        reference.close()
        give_back_freed()


def _static_sizes(cfg: BuildConfig, info: ModelInfo, component: str) -> dict[str, int] | None:
    if not cfg.static_shape:
        return None
    height, width = cfg.static_shape
    f = info.vae_scale_factor
    batch = {"text_encoder": 2, "unet": 2 * cfg.batch}.get(component, 1)  # [negative, positive]; CFG doubles the U-Net batch
    return {"batch": batch, "sequence": info.text_max_length, "latent_height": height // f, "latent_width": width // f,
            "height": height, "width": width}


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """What already is at `out` may be replaced only with --overwrite, and only if it is an sdrt engine folder."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise SdrtError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise SdrtError(f"--out {out} is not an sdrt engine folder; refusing to replace it, pick another --out")


def _recover_swap(out: Path) -> None:
    """Finish what a build killed during its final swap left: `.OUT.previous` is the old folder."""
    previous = out.with_name(f".{out.name}.previous")
    if not os.path.lexists(previous):
        return
    if os.path.lexists(out):  # the new folder is in place; only the old one's deletion was cut off
        log.warning("removing %s, the replaced engine folder an interrupted build left", previous)
        shutil.rmtree(previous)
    else:  # cut off between the two renames: put the old folder back
        log.warning("restoring %s from %s, where an interrupted build left it", out, previous)
        previous.rename(out)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out`. Builds into the same parent take turns here, and what is at
    `out` now (it may have appeared during the build) is checked again before anything moves."""
    with locked(out.parent):
        _recover_swap(out)
        _check_replaceable(out, overwrite)
        if os.path.lexists(out):
            previous = out.with_name(f".{out.name}.previous")
            out.rename(previous)
            staging.rename(out)
            shutil.rmtree(previous)
            return
        try:
            staging.rename(out)  # a folder with content that appeared since the check makes this fail, never vanish
        except OSError:
            raise SdrtError(f"--out {out} appeared while building and is not empty; nothing was replaced, pick another --out") from None


def _inside_model(path: Path, model_dir: Path) -> bool:
    """Whether `path` resolves inside the model folder (a Hugging Face cache snapshot's links into the
    repository's blobs/ count as inside)."""
    root = model_dir.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    return path.resolve().is_relative_to(root)


def _check_tokenizer(model_dir: Path) -> None:
    """The tokenizer files are copied into the engine folder, which is meant to be shared: they must be
    the model's own files, and must load."""
    for name in TOKENIZER_FILES:
        path = model_dir / "tokenizer" / name
        if os.path.lexists(path) and not _inside_model(path, model_dir):
            raise SdrtError(f"{path} links to {path.resolve()}, outside the model folder; sdrt copies tokenizer files into the "
                            "engine folder and refuses to copy files from elsewhere: replace the link with the file")
    CLIPTokenizer(model_dir / "tokenizer")


def _os_error(exc: OSError, out: Path) -> SdrtError:
    where = f": {exc.filename}" if exc.filename else ""
    return SdrtError(f"building --out {out} failed: {exc.strerror or exc}{where}; nothing was written to --out")


def build_engines(model: Path, out: Path, cfg: BuildConfig, overwrite: bool = False, cache: BuildCache | None = None,
                  source: SourceOptions | None = None) -> dict:
    """Engines for `model`: a diffusers folder, or a single-file checkpoint and/or LoRAs to merge (`source`),
    which become a diffusers folder in a temporary folder beside `out` first."""
    source = source or SourceOptions()
    if not needs_preparing(model, source):
        return _build_engines(model, out, cfg, overwrite, cache, None)
    _check_replaceable(out, overwrite)
    work, work_lock = None, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = temporary_folder(out.parent, f".{out.name}.building-")  # a killed build's leftover is swept like its staging
        work_lock = hold(work)
        log.info("reading %s", model)
        folder, record = prepare_model(model, work, source)
        return _build_engines(folder, out, cfg, overwrite, cache, record)
    except OSError as exc:
        raise _os_error(exc, out) from None
    finally:
        if work_lock is not None:
            os.close(work_lock)
        if work:
            shutil.rmtree(work, ignore_errors=True)
            untrack(work)


def _build_engines(model_dir: Path, out: Path, cfg: BuildConfig, overwrite: bool, cache: BuildCache | None, prepared: dict | None) -> dict:
    try:
        if out.parent.is_dir():
            with locked(out.parent):
                _recover_swap(out)
                remove_leftovers(out.parent, f".{out.name}.building-")
    except OSError as exc:
        raise _os_error(exc, out) from None
    _check_replaceable(out, overwrite)
    if os.path.lexists(out.parent) and not out.parent.is_dir():
        raise SdrtError(f"--out {out}: {out.parent} is a file, not a folder")
    info = read_model_info(model_dir)
    if info.class_labels == "image_embeds":
        info = dataclasses.replace(info, image_normalizer=_image_normalizer(model_dir))
    tasks = model_tasks(info)
    _check_tokenizer(model_dir)
    extras = read_json(model_dir / MODEL_EXTRAS) if (model_dir / MODEL_EXTRAS).is_file() else {}
    engine = engine_class(cfg.backend)
    engine.check(cfg)
    for option, size in (("--static-shape", cfg.static_shape), ("--reference-size", cfg.reference_size)):
        if size and (size[0] <= 0 or size[1] <= 0 or size[0] % info.vae_scale_factor or size[1] % info.vae_scale_factor):
            raise SdrtError(f"{option} {size[0]}x{size[1]}: height and width must be positive multiples of {info.vae_scale_factor}")
    cache = cache or BuildCache(None)
    defaults = extras.get("defaults", {})
    reference_size = cfg.static_shape or cfg.reference_size or (defaults.get("height", info.default_height), defaults.get("width", info.default_width))
    if cfg.cache_branch is not None and not 0 <= cfg.cache_branch < cache_branches(info):
        raise SdrtError(f"--cache-branch {cfg.cache_branch} is not accepted for this U-Net: 0 .. {cache_branches(info) - 1} "
                        f"(its last up block has {info.unet_up_layers} layers)")
    specs = component_specs(info, cfg.cache_branch)
    scheduler_config = _scheduler_config(model_dir)
    staging, staging_lock = None, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = temporary_folder(out.parent, f".{out.name}.building-")
        staging_lock = hold(staging)  # the folder is this live build's until the process ends, however it ends
        started, stages = time.perf_counter(), Stages()
        with stages.stage("export"):
            export_errors, export_hit, known = _export(model_dir, info, specs, staging, cache, cfg.cache_branch)  # portable graphs: never rewritten
            give_back_freed()  # torch's copies of the weights
        onnx_hashes = {name: [known[p] for p in _files(staging / name)] for name in specs}
        prompt_sets = extras.get("prompts", {})
        calibration_prompts = list(prompt_sets.get("calibration", prompts.CALIBRATION))[: cfg.calibration_prompts]
        calibration = None
        components, keys = {}, {}
        for name, spec in specs.items():
            needs_calibration = engine.needs_calibration(name, cfg)
            sizes = _static_sizes(cfg, info, name)
            key = cache_key("engine", component=name, backend=cfg.backend, version=engine.version(), layout=engine.artifact_layout,
                            options=cfg.cache_fields(), spec=spec.to_json(), static=sizes,
                            onnx=onnx_hashes if needs_calibration else onnx_hashes[name],
                            calibration_prompts=calibration_prompts if needs_calibration else None)
            keys[name] = key
            placed = cache.fetch(key, staging / name)
            hit = placed is not None
            if hit:
                log.info("%s engine: the build cache has it", name)
            else:
                if needs_calibration and calibration is None:
                    log.info("recording U-Net inputs of %d prompts x %d steps at %dx%d for calibration", len(calibration_prompts),
                             cfg.calibration_steps, *reference_size)
                    from .accuracy import record_unet_inputs

                    with stages.stage("calibration"), _reference(model_dir, info, scheduler_config, specs, staging, cfg.threads) as reference:
                        calibration = record_unet_inputs(reference, calibration_prompts, cfg.calibration_steps, reference_size)
                log.info("building the %s engine (%s, %s, %s)", name, cfg.backend, cfg.precision, cfg.device)
                with stages.stage(name):
                    built = engine.build(staging / name / "model.onnx", spec, cfg, sizes, calibration[name] if needs_calibration else None)
                placed = cache.store(key, built)
            known.update(placed)
            components[name] = {"spec": (static_spec(spec, sizes) if sizes else spec).to_json(), "export_max_abs_error": export_errors[name],
                                "artifacts": [p.relative_to(staging).as_posix() for p in sorted(placed)], "cache": "hit" if hit else "miss"}
        tok_dir = staging / "tokenizer"
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            if (model_dir / "tokenizer" / name).is_file():
                shutil.copy2(model_dir / "tokenizer" / name, tok_dir / name)
        recommended, _ = resolve_scheduler(defaults.get("scheduler") or default_scheduler_name(scheduler_config), False)
        interop = engine.write_interop(staging, model_dir, info, scheduler_config, recommended, cfg, cache)

        accuracy = {"reference": True} if (cfg.backend, cfg.precision) == ("onnxruntime", "fp32") else None
        eval_prompts = list(prompt_sets.get("evaluation", prompts.EVALUATION))[: cfg.accuracy_prompts]
        compute = engine.compute_type(cfg.precision, cfg.device)
        accuracy_key = cache_key("accuracy", engines=keys, prompts=eval_prompts, steps=cfg.accuracy_steps, size=reference_size,
                                 batch=cfg.batch, device=cfg.device, compute=compute)
        with tempfile.TemporaryDirectory() as tmp:
            cached = cache.fetch(accuracy_key, Path(tmp)) if accuracy is None and cfg.accuracy_prompts else None
            if cached:
                accuracy = json.loads(next(iter(cached)).read_text())
        if accuracy is None and cfg.accuracy_prompts:
            from .accuracy import accuracy_report, reference_runs

            log.info("checking accuracy against fp32 on %d prompts x %d steps at %dx%d", len(eval_prompts), cfg.accuracy_steps, *reference_size)
            with stages.stage("accuracy"):  # the reference, then the candidate: never both open
                with _reference(model_dir, info, scheduler_config, specs, staging, cfg.threads) as reference:
                    runs = reference_runs(reference, eval_prompts, cfg.accuracy_steps, reference_size,
                                          num_images=cfg.batch if cfg.static_shape else 1)
                load_cfg = LoadConfig(device=cfg.device, threads=cfg.threads, precision=cfg.precision)
                built = {name: engine.load(staging / name, ComponentSpec.from_json(components[name]["spec"]), load_cfg) for name in specs}
                candidate = StableDiffusion(info, scheduler_config, reference.tokenizer, built)
                try:
                    accuracy = accuracy_report(runs, candidate)
                finally:
                    candidate.close()
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "accuracy.json").write_text(json.dumps(accuracy))
                cache.store(accuracy_key, [Path(tmp) / "accuracy.json"])
        if accuracy and not accuracy.get("reference"):
            if cfg.min_psnr is not None and accuracy["min_image_psnr_db"] < cfg.min_psnr:
                raise SdrtError(f"--min-psnr {cfg.min_psnr}: the {cfg.backend} {cfg.precision} engines reach {accuracy['min_image_psnr_db']:.1f} dB "
                                "against fp32; no engine folder was written")
        manifest = {
            "model": {"source": prepared["source"] if prepared else str(model_dir.resolve()), **info.to_json()},
            "prepared": {k: v for k, v in prepared.items() if k != "source"} if prepared else None,  # checkpoint detection, LoRAs
            "tasks": list(tasks),
            "scheduler_config": scheduler_config,
            "defaults": defaults,
            "works": extras.get("works"),
            "backend": {"name": cfg.backend, "version": engine.version(), "device": cfg.device, "compute": compute},
            "precision": cfg.precision,
            "build_options": cfg.cache_fields(),
            "static_shape": {"height": cfg.static_shape[0], "width": cfg.static_shape[1], "batch": cfg.batch} if cfg.static_shape else None,
            "cpu": cpu_description(),
            "build_seconds": round(time.perf_counter() - started, 2),
            "build_stages": stages.record,  # {stage: seconds, peak RSS in MB}: export, calibration, each engine built, accuracy
            "export_cache": "hit" if export_hit else "miss",
            "components": components,
            "accuracy": accuracy,
            "files": hash_files(staging, [p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()], known=known),
            **interop,  # links, and what other runtimes need to know to load the folder
        }
        log.info("writing %s", out)
        write_manifest(staging, manifest)
        _usual_permissions(staging)
        _publish(staging, out, overwrite)
        return manifest
    except OSError as exc:
        raise _os_error(exc, out) from None
    finally:
        if staging_lock is not None:
            os.close(staging_lock)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
            untrack(staging)
