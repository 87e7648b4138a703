"""`manifest.json` of an engine folder: what was built, from what, and the hash of every file.

`load_manifest` refuses a folder whose format version or file hashes do not match, so that
`sdrt generate` never runs engines that were changed, truncated or built by another format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SdrtError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_files(root: Path, paths: list[Path], known: dict[Path, str] | None = None) -> dict[str, str]:
    """sha256 of each file by its path relative to `root`; `known` holds hashes already computed."""
    known = known or {}
    return {p.relative_to(root).as_posix(): known.get(p) or file_sha256(p) for p in sorted(paths)}


def model_hash(manifest: dict[str, Any]) -> str:
    """Short identity of the built engines: a hash over all file hashes."""
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    return digest[:12]


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "sdrt_version": __version__, **manifest}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def verify_files(root: Path, manifest: dict[str, Any], paths: list[Path] | None = None) -> None:
    """Check the hashes of `paths` (default: every file the manifest lists)."""
    files = manifest.get("files", {})
    names = list(files) if paths is None else [p.relative_to(root).as_posix() for p in paths]
    for rel in names:
        file = root / rel
        if rel not in files:
            raise SdrtError(f"engine file {file} is not listed in {MANIFEST}; rebuild the engines with `sdrt build`")
        if not file.is_file():
            raise SdrtError(f"engine file {file} is missing; rebuild the engines with `sdrt build`")
        if file_sha256(file) != files[rel]:
            raise SdrtError(f"engine file {file} does not match its hash in {MANIFEST}; rebuild the engines with `sdrt build`")


def load_manifest(root: Path, verify: bool = True) -> dict[str, Any]:
    """Read and check the format version; with `verify`, check every file's hash too."""
    path = root / MANIFEST
    if not root.is_dir():
        raise SdrtError(f"engine folder {root} does not exist; build one with `sdrt build MODEL --out {root}`")
    if not path.is_file():
        raise SdrtError(f"{root} is not an sdrt engine folder ({MANIFEST} is missing); build one with `sdrt build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} is not valid JSON ({exc}); rebuild the engines with `sdrt build`") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise SdrtError(f"{path} has format version {version!r}, this sdrt reads version {FORMAT_VERSION}; rebuild the engines with `sdrt build`")
    if verify:
        verify_files(root, manifest)
    return manifest
