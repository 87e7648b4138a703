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
