"""`manifest.json` of an engine folder: what was built, from what, and the hash of every file.

`load_manifest` refuses a folder whose format version, own content hash or file hashes do not
match, so that `sdrt generate` never runs engines, or math settings (scaling factor, scheduler
betas, prediction type, ...), that were changed, truncated or built by another format. Paths in
`files` must name regular files inside the folder; `links` (optional) names symbolic links inside
it, each to a file `files` lists (a copy of that file in the link's place is accepted too). The
hashes make an engine folder tamper-evident, not authentic: whoever can rewrite every hash can
make any folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from . import __version__
from .errors import SdrtError

FORMAT_VERSION = 2  # 2: content_sha256 covers the manifest itself
MANIFEST = "manifest.json"
CONTENT_HASH = "content_sha256"
REQUIRED = {"model": dict, "scheduler_config": dict, "backend": dict, "precision": str, "components": dict, "files": dict}


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_files(root: Path, paths: list[Path], known: dict[Path, str] | None = None) -> dict[str, str]:
    """sha256 of each file by its path relative to `root`; `known` holds hashes already computed."""
    known = known or {}
    return {p.relative_to(root).as_posix(): known.get(p) or file_sha256(p) for p in sorted(paths)}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_hash(manifest: dict[str, Any]) -> str:
    """Short identity of what makes the image: the model facts, the scheduler config and every file hash."""
    return _digest({k: manifest[k] for k in ("model", "scheduler_config", "files")})[:12]


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "sdrt_version": __version__, **manifest}
    manifest[CONTENT_HASH] = _digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _inside(root: Path, rel: str) -> Path:
    if not isinstance(rel, str) or not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or any(p in ("..", ".") for p in PurePosixPath(rel).parts):
        raise SdrtError(f"{root / MANIFEST} lists {rel!r}, which is not a path inside the engine folder; rebuild the engines with `sdrt build`")
    return root / rel


def engine_file(root: Path, rel: str) -> Path:
    """The file `rel` names, refused unless it is a plain relative path to a regular file inside `root`."""
    file = _inside(root, rel)
    if file.is_symlink() or (file.exists() and not file.resolve().is_relative_to(root.resolve())):
        raise SdrtError(f"engine file {file} is a link; engine folders hold regular files only: rebuild the engines with `sdrt build`")
    if not file.is_file():
        raise SdrtError(f"engine file {file} is missing; rebuild the engines with `sdrt build`")
    return file


def verify_files(root: Path, manifest: dict[str, Any], paths: list[Path] | None = None, verified: Any = None) -> None:
    """Check the hashes of `paths` (default: every file the manifest lists). `verified` (a
    sdrt.verified.VerifiedFiles) skips the files hashed before and unchanged since, and learns the rest."""
    files = manifest["files"]
    names = list(files) if paths is None else [p.relative_to(root).as_posix() for p in paths]
    for rel in names:
        if rel not in files:
            raise SdrtError(f"engine file {root / rel} is not listed in {MANIFEST}; rebuild the engines with `sdrt build`")
        file = engine_file(root, rel)
        if verified is not None and verified.unchanged(rel, file, files[rel]):
            continue
        if file_sha256(file) != files[rel]:
            raise SdrtError(f"engine file {file} does not match its hash in {MANIFEST}; rebuild the engines with `sdrt build`")
        if verified is not None:
            verified.remember(rel, file, files[rel])
    if verified is not None:
        verified.save()
    if paths is None:
        verify_links(root, manifest)


def verify_links(root: Path, manifest: dict[str, Any]) -> None:
    """Each link of `links` points at its listed target (a regular file in its place must hash like the target)."""
    links = manifest.get("links") or {}
    if not isinstance(links, dict):
        raise SdrtError(f"{root / MANIFEST} holds the wrong type under 'links'; rebuild the engines with `sdrt build`")
    for rel, target in links.items():
        link, target_file = _inside(root, rel), _inside(root, target)
        if target not in manifest["files"]:
            raise SdrtError(f"{root / MANIFEST} links {rel!r} to {target!r}, which it does not list; rebuild the engines with `sdrt build`")
        if link.is_symlink():
            text = os.readlink(link)
            if os.path.isabs(text) or os.path.normpath(link.parent / text) != os.path.normpath(target_file):
                raise SdrtError(f"engine link {link} points to {text!r}, not {target_file.name!r}; rebuild the engines with `sdrt build`")
        elif not link.is_file():
            raise SdrtError(f"engine link {link} is missing; rebuild the engines with `sdrt build`")
        elif file_sha256(link) != manifest["files"][target]:
            raise SdrtError(f"engine file {link} (a copy of {target_file.name}) does not match its hash in {MANIFEST}; "
                            "rebuild the engines with `sdrt build`")


def load_manifest(root: Path, verify: bool = True) -> dict[str, Any]:
    """Read and check the format version; with `verify`, check every file's hash too."""
    path = root / MANIFEST
    if os.path.lexists(root) and not root.is_dir():
        raise SdrtError(f"{root} is a file, not an engine folder; give the folder `sdrt build --out` made")
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
    content = {k: v for k, v in manifest.items() if k != CONTENT_HASH}
    if manifest.get(CONTENT_HASH) != _digest(content):
        raise SdrtError(f"{path} was changed after it was built (its {CONTENT_HASH} does not match its content); "
                        "rebuild the engines with `sdrt build`")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise SdrtError(f"{path} lacks {key!r} or holds the wrong type there; rebuild the engines with `sdrt build`")
    if verify:
        verify_files(root, manifest)
    return manifest
