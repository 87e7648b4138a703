"""PNG output: generation parameters in a text chunk, atomic writes, no silent overwrites, even between
concurrent runs."""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .errors import SdrtError
from .files import publish_file, remove_leftovers, temporary_file, untrack
from .schedulers import WEBUI_NAME_OF

METADATA_KEY = "sdrt"
WEBUI_KEY = "parameters"  # the AUTOMATIC1111 WebUI's infotext, read by its "PNG Info", ComfyUI and image sites


def output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    if output.suffix.lower() != ".png":
        raise SdrtError(f"--output {output}: only .png is supported")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (without --overwrite) or its folder is not writable."""
    for path in paths:
        if path.exists() and not overwrite:
            raise SdrtError(f"{path} already exists; pass --overwrite to replace it")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise SdrtError(f"--output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise SdrtError(f"--output folder {folder} is not writable")


def usual_mode(directory: bool) -> int:
    """The mode a plain open()/mkdir() would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def webui_parameters(meta: dict[str, Any]) -> str:
    """A generation's parameters in the WebUI's infotext format (prompt, negative prompt, then key: value pairs)."""
    lines = [meta["prompt"]] + ([f"Negative prompt: {meta['negative_prompt']}"] if meta["negative_prompt"] else [])
    fields = {"Steps": meta["steps"], "Sampler": WEBUI_NAME_OF.get(meta["scheduler"], meta["scheduler"]),
              "Schedule type": "Karras" if meta["karras_sigmas"] else None, "CFG scale": meta["guidance"], "Seed": meta["image_seed"] or meta["seed"],
              "Size": f"{meta['width']}x{meta['height']}", "Model hash": meta["model_hash"], "Model": meta.get("model"), "VAE": meta.get("vae"),
              "LoRAs": ", ".join(f"{lora['name']}:{lora['weight']:g}" for lora in meta.get("loras", [])) or None,
              "Denoising strength": meta.get("strength"), "Mask blur": meta.get("mask_blur")}
    if meta["num_images"] > 1 and meta["image_seed"] is None:  # one generator drew the whole batch: the seed alone is not enough
        fields.update({"Batch size": meta["num_images"], "Batch pos": meta["image_index"]})
    fields["Version"] = f"sdrt {__version__}"
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)])


def _png_info(metadata: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    if "prompt" in metadata:
        info.add_itxt(WEBUI_KEY, webui_parameters(metadata))
    return info


def png_bytes(image: np.ndarray, metadata: dict[str, Any]) -> bytes:
    """image: (H, W, 3) uint8 -> the PNG `save_png` writes, in memory (what the server sends)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", pnginfo=_png_info(metadata))
    return buffer.getvalue()


def save_png(image: np.ndarray, path: Path, metadata: dict[str, Any], overwrite: bool = False) -> None:
    """image: (H, W, 3) uint8. Written to a temporary file in the same folder (locked while this process
    lives), then moved to `path` in one step that, without `overwrite`, fails if `path` exists by then."""
    info = _png_info(metadata)
    folder = path.parent if str(path.parent) else Path(".")
    prefix, tmp, fd = f".{path.name}.", None, None
    try:
        remove_leftovers(folder, prefix, ".tmp")
        tmp, fd = temporary_file(folder, prefix, ".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is published or removed
        with os.fdopen(fd, "wb", closefd=False) as f:
            Image.fromarray(image, mode="RGB").save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, usual_mode(directory=False))  # mkstemp makes owner-only files; outputs get the usual mode
        publish_file(tmp, path, overwrite)
    except OSError as exc:
        raise SdrtError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            untrack(tmp)
        if fd is not None:
            os.close(fd)


def read_metadata(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
