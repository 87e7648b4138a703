"""Verify once, trust while unchanged: which files of an engine folder this user has hashed, and what
each file's identity was then (size, mtime and ctime in nanoseconds, inode, device).

A file whose identity still matches its record, and whose recorded sha256 is the one the manifest
lists now, is not hashed again. Any write to a file moves its mtime and ctime; `touch`/`os.utime` can
put the mtime back but not the ctime, which only the kernel sets (to the current time, on every
change of content or metadata). So a changed file always differs from its record, however it was
changed, short of resetting the system clock. Records live in the user's cache
($SDRT_CACHE_DIR/verified/, one file per engine folder path), not in the engine folder: a folder may
be shared or read-only, and a copy elsewhere (new inodes) is verified once on its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from .engines.cache import cache_root

log = logging.getLogger(__name__)

VERIFY_MODES = ("always", "changed", "never")


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedFiles:
    def __init__(self, root: Path, content_hash: str):
        folder = self._folder = str(root.resolve())
        self._path = cache_root() / "verified" / f"{hashlib.sha256(folder.encode()).hexdigest()[:32]}.json"
        self._content_hash = content_hash
        self._files: dict[str, list] = {}
        self._learned = False  # whether this load hashed files the record did not vouch for
        self._lock = threading.Lock()  # components are verified on two threads at once
        try:
            record = json.loads(self._path.read_text(encoding="utf-8"))
            if record.get("folder") == folder and record.get("manifest") == content_hash:
                self._files = record["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no record, or an unreadable one: everything is hashed

    def unchanged(self, rel: str, file: Path, sha256: str) -> bool:
        """Whether `file` was hashed to `sha256` before and has not changed since."""
        entry = self._files.get(rel)
        return entry is not None and entry[0] == sha256 and entry[1] == _identity(file)

    def remember(self, rel: str, file: Path, sha256: str) -> None:
        with self._lock:
            self._files[rel] = [sha256, _identity(file)]
            self._learned = True

    def save(self) -> None:
        """Write the record (atomically) if this load learned anything; a cache that cannot be written only
        means hashing again next time."""
        with self._lock:
            if self._learned:
                self._write()

    def _write(self) -> None:
        tmp = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self._path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"folder": self._folder, "manifest": self._content_hash, "files": self._files}, f)
            os.replace(tmp, self._path)
        except OSError as exc:
            log.debug("could not record verified files in %s: %s", self._path, exc)
            if tmp:
                Path(tmp).unlink(missing_ok=True)
