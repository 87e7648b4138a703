"""Seconds to load an engine folder (`StableDiffusion.from_engine_folder`) with each --verify mode, each load in a
fresh process (nothing reused but the OS page cache), modes interleaved so drift hits them alike.

    python benchmarks/load_time.py ENGINES [--verify never,always,changed] [--repeat 3]

To compare two versions of sdrt, run it from each checkout in turn (PYTHONPATH=that checkout)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

ONE_LOAD = """
import sys, time
from pathlib import Path
from sdrt.pipeline import StableDiffusion
start = time.perf_counter()
StableDiffusion.from_engine_folder(Path(sys.argv[1]), verify=sys.argv[2])
print(time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines")
    parser.add_argument("--verify", default="never,always,changed")
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args()
    modes = a.verify.split(",")
    subprocess.run([sys.executable, "-c", ONE_LOAD, a.engines, "never"], check=True, capture_output=True)  # fills the page cache
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(a.repeat):
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", ONE_LOAD, a.engines, mode], check=True, capture_output=True, text=True).stdout
            times[mode].append(float(out.split()[-1]))
    for mode, values in times.items():
        print(f"--verify {mode:8s} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
