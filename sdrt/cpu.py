"""What this CPU offers that decides int8 and fp16 speed (read from /proc/cpuinfo on Linux)."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

from .errors import SdrtError

log = logging.getLogger(__name__)

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def cpu_description() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    features = [f for f in FEATURES if f in flags]
    return {"model": model, "cores": os.cpu_count(), "features": features,
            "int8_dot_product": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroup cpusets), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def usable_threads(option: str, threads: int) -> int:
    """A thread count between 1 and the cores this process may use; 0 stays 0 (all of them, see usable_cores)."""
    cores = usable_cores()
    if threads < 0:
        raise SdrtError(f"{option} {threads} is not accepted: give 0 (all {cores} cores) or 1 .. {cores}")
    if threads > cores:
        log.warning("%s %d is more than the %d cores this machine gives sdrt; using %d", option, threads, cores, cores)
        return cores
    return threads


def threads_per_worker(option: str, threads: int, workers: int) -> int:
    """--threads for each of `workers` pipelines sharing this machine: as given, else (0) the cores divided among them."""
    return usable_threads(option, threads) or max(1, usable_cores() // workers)
