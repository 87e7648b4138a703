"""PNG output: generation parameters in a text chunk, atomic writes, no silent overwrites."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import SdrtError

METADATA_KEY = "sdrt"


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


def save_png(image: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """image: (H, W, 3) uint8. Written to a temporary file in the same folder, then renamed."""
    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image, mode="RGB").save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, usual_mode(directory=False))  # mkstemp makes owner-only files; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SdrtError(f"could not write {path}: {exc.strerror or exc}") from None


def read_metadata(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
