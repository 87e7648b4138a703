"""Refuse, before any work, a request the machine cannot hold; and read a process's peak memory, stage by stage.

Checked once the engines are loaded (their weights are then already taken from what is available):
what the run still needs is at least the VAE decoder's mid-block attention scores, (1, T, T)
float32 with T the latent pixels (H/f x W/f): every Stable Diffusion VAE attends over all of them
at once, and T^2 is what makes 4096x4096 impossible on a desktop long before anything else does.
The U-Net's attention is larger still (a batch of 2 with guidance, several heads) but is not
counted: where its first attention level sits differs between models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import SdrtError

GIB = 2**30


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable + free swap, capped by a cgroup v2 limit; None where unknown."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    fields = {}
    for line in meminfo.read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024
    if "MemAvailable" not in fields:
        return None
    available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and used.is_file():
        text = limit.read_text().strip()
        if text.isdigit():
            available = min(available, int(text) - int(used.read_text().strip()))
    return available


def attention_bytes(latent_pixels: int) -> int:
    """The VAE decoder's mid-block attention scores: (1, T, T) float32."""
    return latent_pixels**2 * 4


def check_fits(need: int, what: str) -> None:
    available = available_bytes()
    if available is not None and need > available:
        raise SdrtError(f"{what} needs at least {need / GIB:.1f} GiB more memory (its attention scores alone), and this machine "
                        f"has {available / GIB:.1f} GiB available with the engines loaded; ask for a smaller --height/--width")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to this program image; ru_maxrss on Linux
    also counts the parent's pages from before exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """VmHWM back to the current RSS (Linux: /proc/self/clear_refs), so that the next reading is one stage's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Stages:
    """Seconds and peak resident memory (MB) of a process's successive stages: {stage: {"seconds", "peak_rss_mb"}};
    the peak is None where the OS cannot reset it between stages."""

    def __init__(self):
        self.record: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        staged, started = reset_peak(), time.perf_counter()
        try:
            yield
        finally:
            self.record[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_rss_mb()) if staged else None}


def give_back_freed() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim; elsewhere nothing): what a stage freed then stops
    counting against the next stage's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
