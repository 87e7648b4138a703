"""Refuse, before any work, a request the machine cannot hold.

Checked once the engines are loaded (their weights are then already taken from what is available):
what the run still needs is at least its largest attention-score tensor, (B, T, T) float32 with T
the latent pixels (H/f x W/f), counted with one head.
Every SD U-Net has self-attention at a resolution where T is at least that of its first attention
level, and the VAE decoder's mid block attends over all T latent pixels; both grow with T^2, which is
what makes 4096x4096 impossible on a desktop long before anything else does.
"""

from __future__ import annotations

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


def attention_bytes(latent_pixels: int, unet_batch: int) -> int:
    """The attention scores of the U-Net's batch (one head) or of the VAE decoder's mid block (batch 1)."""
    return max(unet_batch, 1) * latent_pixels**2 * 4


def check_fits(need: int, what: str) -> None:
    available = available_bytes()
    if available is not None and need > available:
        raise SdrtError(f"{what} needs at least {need / GIB:.1f} GiB more memory (its attention scores alone), and this machine "
                        f"has {available / GIB:.1f} GiB available with the engines loaded; ask for a smaller --height/--width or --num-images")
