"""The baseline sdrt is measured against: diffusers' StableDiffusionPipeline, PyTorch eager fp32 on
the CPU, with the same model, prompt, size, steps, scheduler and seed as an `sdrt generate` run.

    python benchmarks/diffusers_baseline.py MODEL_DIR --steps 20 --height 256 --width 256 \
        --scheduler dpmpp_2m --seed 42 --threads 2 --output baseline.png

Prints one JSON line: load and generation seconds and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from sdrt.schedulers import DIFFUSERS_CLASS_OF


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--scheduler", default="dpmpp_2m", choices=DIFFUSERS_CLASS_OF)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import diffusers
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    with torch.inference_mode():
        image = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, height=args.height, width=args.width,
                     generator=torch.Generator().manual_seed(args.seed)).images[0]
    done = time.perf_counter()
    if args.output:
        image.save(args.output)
    print(json.dumps({"load_s": round(loaded - started, 2), "generate_s": round(done - loaded, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
