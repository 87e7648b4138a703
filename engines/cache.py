"""A content-addressed cache of build products: a key is the hash of everything the product
depends on (ONNX bytes, component spec, precision and options, backend version), never "the file
exists". Entries are folders of files, linked into a build where the filesystem allows, else copied,
and checked against their recorded hashes whenever they are reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sdrt.files import hold, remove_leftovers, temporary_folder, untrack
from sdrt.manifest import file_sha256

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # in a finished entry: {file name: sha256}


def cache_root() -> Path:
    base = os.environ.get("SDRT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt"
    return Path(base)


def cache_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:32]}"


def _place(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)  # never write through an existing link into another entry
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class BuildCache:
    """Entries are verified before they are used: an entry's `.complete` record holds the sha256 of
    each of its files, and `fetch` checks them. An entry whose files changed (they are hard-linked
    into engine folders, so an edit there reaches the cache) is deleted and reported as a miss, so
    the build does the work again. A cache that cannot be read or written is switched off for the
    rest of the build with a warning: it speeds builds up, it never decides whether they work."""

    def __init__(self, root: Path | None, enabled: bool = True):
        self.root = root or cache_root()
        self.enabled = enabled

    def _disable(self, action: str, exc: OSError) -> None:
        log.warning("the build cache %s cannot be %s (%s); building without it (set SDRT_CACHE_DIR to a writable folder, "
                    "or pass --no-cache)", self.root, action, exc.strerror or exc)
        self.enabled = False

    def _record(self, entry: Path) -> dict[str, str] | None:
        try:
            record = json.loads((entry / COMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not record:
            return None
        return record

    def _evict(self, entry: Path, why: str) -> None:
        log.warning("build cache entry %s %s; deleting it and doing the work again", entry.name, why)
        shutil.rmtree(entry, ignore_errors=True)

    def fetch(self, key: str, into: Path) -> dict[Path, str] | None:
        """Place the entry's files into `into` after checking their hashes; -> {placed path: sha256},
        None on a miss (including an entry that failed its check and was deleted)."""
        entry = self.root / key
        if not self.enabled or not (entry / COMPLETE).is_file():
            return None
        record = self._record(entry)
        if record is None:
            self._evict(entry, "has no valid content record")
            return None
        try:
            names = sorted(p.name for p in entry.iterdir() if p.name != COMPLETE)
            if names != sorted(record):
                self._evict(entry, "holds other files than it recorded")
                return None
            for name in names:
                if file_sha256(entry / name) != record[name]:
                    self._evict(entry, f"has a changed {name}")
                    return None
            into.mkdir(parents=True, exist_ok=True)
            placed = {}
            for name in names:
                _place(entry / name, into / name)
                placed[into / name] = record[name]
            return placed
        except OSError as exc:
            self._disable("read", exc)
            return None

    def store(self, key: str, files: list[Path]) -> dict[Path, str]:
        """Add the files as an entry (linked where the filesystem allows); -> {file: sha256}."""
        hashes = {f: file_sha256(f) for f in files}
        entry = self.root / key
        if not self.enabled or (entry / COMPLETE).is_file():
            return hashes
        tmp, lock = None, None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.root, ".")  # entries that killed builds were storing
            if entry.is_dir():  # an entry without its record: never complete, or damaged
                shutil.rmtree(entry)
            tmp = temporary_folder(self.root, f".{key}.")
            lock = hold(tmp)
            for f in files:
                _place(f, tmp / f.name)
            (tmp / COMPLETE).write_text(json.dumps({f.name: h for f, h in hashes.items()}), encoding="utf-8")
            tmp.rename(entry)
            untrack(tmp)
            tmp = None
        except OSError as exc:
            if not (entry / COMPLETE).is_file():  # else another build stored it first
                self._disable("written", exc)
        finally:
            if lock is not None:
                os.close(lock)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                untrack(tmp)
        return hashes


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
