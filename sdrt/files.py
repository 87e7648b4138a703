"""Files the user owns and folders sdrt makes: no-clobber publishing, locks, and the leftovers of
killed runs.

Every temporary file or folder sdrt writes beside a user's path is held under an exclusive
`flock` by the process writing it. The kernel drops that lock when the process ends, however it
ends (SIGKILL included), so the next run can tell a leftover (its lock can be taken) from the work
of a live process (it cannot) and delete only the former. A leftover must also be older than
LEFTOVER_AGE_S: that covers the instant between creating an entry and locking it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import SdrtError

log = logging.getLogger(__name__)

LEFTOVER_AGE_S = 10.0

_temporaries: set[Path] = set()  # what this process is writing and must not leave behind


def track(path: Path) -> None:
    """Mark `path` as this process's work in progress (until `untrack`): `remove_temporaries`, which
    the CLI's Ctrl-C / SIGTERM handler calls, deletes it."""
    _temporaries.add(path)


def untrack(path: Path) -> None:
    _temporaries.discard(path)


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new folder `parent/prefix<random>`, tracked before it exists: an interrupt at any moment finds it."""
    path = parent / f"{prefix}{secrets.token_hex(6)}"
    track(path)
    path.mkdir(mode=0o700)
    return path


def temporary_file(parent: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new file `parent/prefix<random>suffix`, tracked before it exists; -> (path, descriptor open for writing)."""
    path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
    track(path)
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def remove_temporaries() -> None:
    for path in list(_temporaries):
        for _ in range(3):  # a library's thread may still be adding files while the folder is deleted
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if not os.path.lexists(path):
                break


def hold(path: Path) -> int:
    """Take the exclusive lock on `path` (a file or folder) for as long as this process keeps the
    returned descriptor open."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on `path` (waiting for it) for the duration of the block."""
    fd = hold(path)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Delete the entries of `folder` named `prefix`...`suffix` whose lock no live process holds; -> deleted."""
    removed = []
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix)) if folder.is_dir() else []
    for path in (folder / n for n in names):
        try:
            if time.time() - path.lstat().st_mtime < LEFTOVER_AGE_S:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # vanished, or a symlink: not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while removing, so two sweepers do not race
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except BlockingIOError:
            continue  # a live process is writing it
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted run: %s", path, exc.strerror or exc)
            continue
        finally:
            os.close(fd)
        log.warning("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


def publish_file(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move a finished temporary file to `target` in one step. Without `overwrite` the step fails
    if `target` exists, even if it appeared a moment ago (a hard link never replaces a file)."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise SdrtError(f"{target} already exists (it appeared while this run worked); pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        with tmp.open("rb") as src:  # a filesystem without hard links: create exclusively, then copy
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise SdrtError(f"{target} already exists (it appeared while this run worked); pass --overwrite to replace it") from None
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
    tmp.unlink()

