"""Throughput of `sdrt serve` (images per minute) under a steady load: the plain server, and Ray Serve with 1 and
2 replicas sharing the machine's cores, in one run.

    python benchmarks/serve_throughput.py ENGINES [--requests 60] [--concurrency 8] [--steps 20] [--size 64]

Each configuration: start the server, one untimed request, then REQUESTS txt2img requests (distinct seeds) from
CONCURRENCY client threads; images/min = requests / wall time. Every answer must be a 200 with the image its
seed gives (checked against the first configuration's), so a faster row cannot be a wrong one."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import start_server, stop_server  # noqa: E402


def measure(engines: str, args: list[str], requests: int, concurrency: int, steps: int, size: int) -> tuple[float, dict[int, str]]:
    process, url = start_server(Path(engines), *args, "--max-queue", str(concurrency), timeout=300)
    try:
        def one(seed: int) -> tuple[int, str]:
            body = {"prompt": "a red circle on a white background", "steps": steps, "width": size, "height": size, "seed": seed,
                    "sampler_name": "DPM++ 2M"}
            answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
            answer.raise_for_status()
            return seed, answer.json()["images"][0]

        one(10_000)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            images = dict(pool.map(one, range(requests)))
        return requests / (time.perf_counter() - start) * 60, images
    finally:
        stop_server(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    a = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    configurations = {
        f"sdrt serve, {cores} threads": ["--threads", str(cores)],
        f"--ray, 1 replica x {cores} threads": ["--ray", "--replicas", "1", "--threads", str(cores)],
        f"--ray, 2 replicas x {max(1, cores // 2)} threads": ["--ray", "--replicas", "2", "--threads", str(max(1, cores // 2))],
    }
    rows, reference = [], None
    for name, args in configurations.items():
        rate, images = measure(a.engines, args, a.requests, a.concurrency, a.steps, a.size)
        reference = reference or images
        assert images == reference, f"{name}: images differ from the first configuration's"
        rows.append({"configuration": name, "images_per_min": round(rate, 1)})
        print(f"{name:40s} {rate:8.1f} images/min", flush=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith("avx512") or f == "avx2"})
    result = {"rows": rows, "requests": a.requests, "concurrency": a.concurrency, "steps": a.steps, "size": a.size, "cores": cores,
              "cpu_flags": flags}
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
