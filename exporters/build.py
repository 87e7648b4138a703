"""`sdrt build`: export a diffusers model folder to ONNX, build engines, write the manifest.

The folder is assembled under a temporary name beside `out` and renamed into place only when
everything succeeded, so a failed build never leaves a folder that looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sdrt.components import component_specs
from sdrt.engines.base import BuildConfig, engine_class
from sdrt.errors import SdrtError
from sdrt.manifest import MANIFEST, hash_files, write_manifest
from sdrt.model_info import read_model_info
from sdrt.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-3  # max abs error of an fp32 graph against torch before the build fails


def _scheduler_config(model_dir: Path) -> dict:
    """The model's full scheduler config, defaults of its class filled in by diffusers itself."""
    import diffusers

    from sdrt.model_info import read_json, scheduler_config_path

    raw = read_json(scheduler_config_path(model_dir))
    cls = getattr(diffusers, raw.get("_class_name", ""), None)
    if cls is None:
        return raw
    return {"_class_name": raw["_class_name"], **{k: v for k, v in dict(cls.from_config(raw).config).items() if not k.startswith("_")}}


def _usual_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only entries; give the folder the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def build_engines(model_dir: Path, out: Path, cfg: BuildConfig, overwrite: bool = False) -> dict:
    if out.exists() and not overwrite:
        raise SdrtError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SdrtError(f"--out {out} is a folder that is not an sdrt engine folder; refusing to replace it, pick another --out")
    info = read_model_info(model_dir)
    engine = engine_class(cfg.backend)
    engine.check(cfg)
    specs = component_specs(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        from . import onnx_export

        started = time.perf_counter()
        modules = onnx_export.load_modules(model_dir)
        files, components = [], {}
        for name, module in modules.items():
            log.info("exporting %s", name)
            onnx_path = onnx_export.export_component(module, specs[name], onnx_export.trace_sizes(info), staging / name)
            error = onnx_export.check_export(onnx_path, module, specs[name], onnx_export.check_sizes(info))
            if error > EXPORT_TOLERANCE:
                raise SdrtError(f"exported {name} differs from torch by {error:.3g} (tolerance {EXPORT_TOLERANCE}); not building")
            log.info("building %s engine (%s, %s, %s)", name, cfg.backend, cfg.precision, cfg.device)
            artifacts = engine.build(onnx_path, specs[name], cfg)
            files += [p for p in onnx_path.parent.iterdir() if p.is_file()]
            components[name] = {"spec": specs[name].to_json(), "export_max_abs_error": error,
                                "artifacts": [p.relative_to(staging).as_posix() for p in artifacts]}
        del modules
        tok_dir = staging / "tokenizer"
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            if (model_dir / "tokenizer" / name).is_file():
                shutil.copy2(model_dir / "tokenizer" / name, tok_dir / name)
                files.append(tok_dir / name)
        manifest = {
            "model": {"source": str(model_dir.resolve()), **info.to_json()},
            "scheduler_config": _scheduler_config(model_dir),
            "backend": {"name": cfg.backend, "version": engine.version(), "device": cfg.device},
            "precision": cfg.precision,
            "build_seconds": round(time.perf_counter() - started, 2),
            "components": components,
            "files": hash_files(staging, files),
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
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
