"""Prompt accuracy of engines built from sdrt's shapes model, read by the semantic evaluator.

    python benchmarks/shapes_accuracy.py ENGINES [--seen 120] [--held-out 48] [--out report.json]

Draws (prompt, seed) pairs from the grammar (seen color+shape pairs, and the held-out ones the
model never saw), generates each image through sdrt with the engines' default settings, and
reports per-attribute accuracy: color+shape, position (where the prompt gives one), size,
background. Torch-free: it runs wherever `sdrt generate` runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sdrt.pipeline import GenerateRequest, StableDiffusion
from sdrt.shapes import caption, evaluate, random_scene


def prompt_set(count: int, held_out: bool, seed: int) -> list[tuple[str, int]]:
    """(prompt, image seed) pairs; about half name a size and two thirds a position."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(count):
        scene = random_scene(rng, held_out=held_out)
        pairs.append((caption(scene, with_size=rng.random() < 0.5, with_position=rng.random() < 0.67), 10_000 + k))
    return pairs


def score(pipe: StableDiffusion, pairs: list[tuple[str, int]], **overrides) -> dict:
    counts = {"color_shape": [0, 0], "position": [0, 0], "size": [0, 0], "background": [0, 0], "all": [0, 0]}
    failures = []
    for prompt, seed in pairs:
        image = pipe.generate(GenerateRequest(prompt=prompt, seed=seed, **overrides), progress=False)[0]
        result = evaluate(image, prompt)
        checks = {"color_shape": result["color"] and result["shape"], "background": result["background"],
                  "all": all(result.values())}
        for key in ("position", "size"):
            if key in result:
                checks[key] = result[key]
        for key, ok in checks.items():
            counts[key][0] += int(ok)
            counts[key][1] += 1
        if not checks["all"]:
            failures.append({"prompt": prompt, "seed": seed, "wrong": [k for k, v in result.items() if not v]})
    return {"accuracy": {k: (round(100 * c / n, 1) if n else None) for k, (c, n) in counts.items()},
            "counts": {k: n for k, (_, n) in counts.items()}, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=Path)
    parser.add_argument("--seen", type=int, default=120)
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pipe = StableDiffusion.from_engine_folder(args.engines)
    overrides = {k: v for k, v in (("guidance", args.guidance), ("steps", args.steps), ("scheduler", args.scheduler)) if v is not None}
    started = time.perf_counter()
    report = {
        "engines": str(args.engines), "backend": pipe.manifest["backend"]["name"], "precision": pipe.manifest["precision"],
        "settings": {**pipe.defaults, **overrides},
        "seen": score(pipe, prompt_set(args.seen, False, 1), **overrides),
        "held_out": score(pipe, prompt_set(args.held_out, True, 2), **overrides),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    pipe.close()
    summary = {part: report[part]["accuracy"] for part in ("seen", "held_out")}
    print(json.dumps({"precision": report["precision"], "backend": report["backend"], "settings": report["settings"], **summary}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
