"""A content-addressed cache of build products: a key is the hash of everything the product
depends on (ONNX bytes, component spec, precision and options, backend version), never "the file
exists". Entries are folders of files, linked into a build where the filesystem allows, else copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    base = os.environ.get("SDRT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"
    return Path(base)


def cache_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:32]}"


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class BuildCache:
    def __init__(self, root: Path | None, enabled: bool = True):
        self.root = root or cache_root()
        self.enabled = enabled

    def fetch(self, key: str, into: Path) -> list[Path] | None:
        """Place the entry's files into `into`; None on a miss."""
        entry = self.root / key
        if not self.enabled or not (entry / ".complete").is_file():
            return None
        into.mkdir(parents=True, exist_ok=True)
        placed = []
        for src in sorted(entry.iterdir()):
            if src.name != ".complete":
                _place(src, into / src.name)
                placed.append(into / src.name)
        return placed

    def store(self, key: str, files: list[Path]) -> None:
        if not self.enabled:
            return
        entry = self.root / key
        if (entry / ".complete").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        for f in files:
            _place(f, tmp / f.name)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(entry)
        except OSError:  # another build stored it first
            shutil.rmtree(tmp, ignore_errors=True)


# what lives under the cache root, by the prefix of its entries
CACHE_KINDS = {
    "exports": "export-",  # ONNX exports of a model's components
    "engines": "engine-",  # built engine components
    "accuracy": "accuracy-",  # accuracy reports of builds
    "openvino": "openvino",  # OpenVINO's compiled-model cache (a blob per engine component)
    "models": "models",  # random-weight models generated for `sdrt bench`
}


def _entries(root: Path, kind: str) -> list[Path]:
    prefix = CACHE_KINDS[kind]
    if not root.is_dir():
        return []
    if not prefix.endswith("-"):  # a folder whose children are the entries
        folder = root / prefix
        return sorted(folder.iterdir()) if folder.is_dir() else []
    # ".engine-<key>.xxxx" folders are stores that were interrupted
    return sorted(p for p in root.iterdir() if p.name.startswith(prefix) or p.name.startswith("." + prefix))


def cache_usage(root: Path) -> dict[str, dict[str, int]]:
    """kind -> entries, bytes, and bytes_shared: bytes in files also linked from elsewhere (an engine
    folder built from the cache), which deleting the entry does not free."""
    usage = {}
    for kind in CACHE_KINDS:
        entries, total, shared = _entries(root, kind), 0, 0
        for entry in entries:
            for f in [entry] if entry.is_file() else (p for p in entry.rglob("*") if p.is_file()):
                st = f.stat()
                total += st.st_size
                shared += st.st_size if st.st_nlink > 1 else 0
        usage[kind] = {"entries": len(entries), "bytes": total, "bytes_shared": shared}
    return usage


def clear_cache(root: Path, kinds: list[str]) -> int:
    """Delete every entry of `kinds`; -> entries deleted. Engine folders built from the cache keep working
    (their files are links or copies); the next build or load of that kind does its work again."""
    deleted = 0
    for kind in kinds:
        for entry in _entries(root, kind):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            deleted += 1
    return deleted
