"""Prompt accuracy of engines built from sdrt's shapes model, read by the semantic evaluator.

    python benchmarks/shapes_accuracy.py ENGINES [--task txt2img|img2img|inpaint] [--seen 120] [--held-out 48]
                                         [--strength S] [--guidance-cutoff F] [--cache-interval N] [--vae-precision bf16]
                                         [--out report.json] [--examples strip.png]

Draws (prompt, seed) pairs from the grammar (seen color+shape pairs, and the held-out ones the
model never saw), generates each image through sdrt with the engines' default settings, and
reports per-attribute accuracy: color+shape, position (where the prompt gives one), size,
background. Torch-free: it runs wherever `sdrt generate` runs.

Tasks: img2img starts from the prompt's scene drawn in another color (the prompt asks to recolor
it); inpaint starts from the prompt's background alone, with the square where the prompt puts its
shape masked (the prompt asks to add the shape there). `--examples` writes the inputs and results
of the first pairs side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from PIL import Image, ImageDraw

from sdrt.grid import labelled_grid
from sdrt.pipeline import GenerateRequest, StableDiffusion
from sdrt.shapes import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene, caption, evaluate, parse_prompt, random_scene, render, valid

TASKS = ("txt2img", "img2img", "inpaint")
MASK_HALF_SIDE = 0.3  # inpaint: half the masked square's side, as a fraction of the image side (a large shape fits)


def prompt_set(count: int, held_out: bool, seed: int) -> list[tuple[str, int]]:
    """(prompt, image seed) pairs; about half name a size and two thirds a position."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(count):
        scene = random_scene(rng, held_out=held_out)
        pairs.append((caption(scene, with_size=rng.random() < 0.5, with_position=rng.random() < 0.67), 10_000 + k))
    return pairs


def task_inputs(task: str, prompt: str, seed: int, side: int) -> dict:
    """GenerateRequest fields of the task's inputs for one pair (nothing for txt2img)."""
    want, rng = parse_prompt(prompt), np.random.default_rng(seed)
    position = want.get("position") or str(rng.choice(list(POSITIONS)))
    if task == "img2img":
        color = str(rng.choice([c for c in COLORS if c != want["color"] and valid(c, want["background"])]))
        scene = Scene(color, want["shape"], want["background"], want.get("size") or str(rng.choice(SIZES)), position)
        return {"init_image": Image.fromarray(render(scene, side))}
    if task == "inpaint":
        (ax, ay), r = POSITIONS[position], MASK_HALF_SIDE * side
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).rectangle([ax * side - r, ay * side - r, ax * side + r, ay * side + r], fill=255)
        return {"image": Image.new("RGB", (side, side), BACKGROUNDS[want["background"]]), "mask": mask}
    return {}


def score(pipe: StableDiffusion, pairs: list[tuple[str, int]], task: str = "txt2img", examples: list | None = None, **overrides) -> dict:
    counts = {"color_shape": [0, 0], "position": [0, 0], "size": [0, 0], "background": [0, 0], "all": [0, 0]}
    failures = []
    side = pipe.settings(GenerateRequest(prompt="")).height
    for prompt, seed in pairs:
        inputs = task_inputs(task, prompt, seed, side)
        image = pipe.generate(GenerateRequest(prompt=prompt, seed=seed, **inputs, **overrides), progress=False)[0]
        if examples is not None and len(examples) < 4:
            examples.append(([np.asarray(inputs[k].convert("RGB")) for k in ("init_image", "image", "mask") if k in inputs] + [image], prompt))
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
    parser.add_argument("--task", default="txt2img", choices=TASKS)
    parser.add_argument("--strength", type=float, default=None, help="img2img / inpaint (default: the task's)")
    parser.add_argument("--examples", type=Path, default=None, help="PNG: inputs and results of the first 4 seen pairs, a row each")
    parser.add_argument("--seen", type=int, default=120)
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--guidance-cutoff", type=float, default=None, help="as for sdrt generate: a shortcut's cost in accuracy")
    parser.add_argument("--cache-interval", type=int, default=None, help="as for sdrt generate (engines built with --cache-branch)")
    parser.add_argument("--vae-precision", default=None, help="as for sdrt generate")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pipe = StableDiffusion.from_engine_folder(args.engines, vae_precision=args.vae_precision)
    overrides = {k: v for k, v in (("guidance", args.guidance), ("steps", args.steps), ("scheduler", args.scheduler),
                                   ("strength", args.strength), ("guidance_cutoff", args.guidance_cutoff),
                                   ("cache_interval", args.cache_interval)) if v is not None}
    started = time.perf_counter()
    examples: list = []
    report = {
        "engines": str(args.engines), "backend": pipe.manifest["backend"]["name"], "precision": pipe.manifest["precision"],
        "task": args.task, "settings": {**pipe.defaults, **overrides, "vae_precision": args.vae_precision},
        "seen": score(pipe, prompt_set(args.seen, False, 1), args.task, examples, **overrides),
        "held_out": score(pipe, prompt_set(args.held_out, True, 2), args.task, **overrides),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    pipe.close()
    summary = {part: report[part]["accuracy"] for part in ("seen", "held_out")}
    print(json.dumps({"precision": report["precision"], "backend": report["backend"], "task": args.task, "settings": report["settings"], **summary}))
    if args.examples:
        rows = [[np.repeat(np.repeat(image, 3, 0), 3, 1) for image in images] for images, _ in examples]
        columns = {"txt2img": ["result"], "img2img": ["init image", "result"], "inpaint": ["image", "mask", "result"]}[args.task]
        Image.fromarray(labelled_grid(rows, [prompt for _, prompt in examples], columns)).save(args.examples)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
