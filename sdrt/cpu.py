"""What this CPU offers that decides int8 and fp16 speed (read from /proc/cpuinfo on Linux)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
