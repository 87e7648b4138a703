"""`sdrt bench`: every backend x precision against the diffusers baseline, measured in one run.

Each configuration is built with `sdrt build` (timed, in its own process) and measured in a fresh
process (benchmarks/measure.py), so that peak memory belongs to one configuration. The machine's
fp32 GEMM rate and the U-Net's FLOPs are measured in the same run; rows report achieved GFLOP/s,
the fraction of that roofline, and speed and memory ratios against the baseline row.
Writes results.json, report.md and report.png into --out, and each child process's stderr into
--out/logs/; a build or worker that dies is reported with its exit status or signal, peak memory
and last error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.cli import parse_generate
from sdrt.cpu import cpu_description
from sdrt.engines.cache import cache_root
from sdrt.errors import SdrtError
from sdrt.exporters.accuracy import psnr

from .measure import GENAI_PIPELINES, TASKS
from .report import config_name, write_report

RANDOM_KIND = {"tiny": "sd1", "sd15": "sd15", "sd21-base": "sd21-base", "sd21-v": "sd21-v", "sd-x4-upscaler": "sd-x4-upscaler"}
MODEL_NAMES = tuple(RANDOM_KIND)
# baseline -> torch dtype of the diffusers pipeline; ratios are against "diffusers" (fp32), the others are further rows.
# openvino-genai: OpenVINO GenAI's C++ pipeline on each openvino configuration's engine folder, a row after sdrt's
BASELINES = {"diffusers": "fp32", "diffusers-bf16": "bf16", "openvino-genai": None}
GENAI_TASKS = tuple(GENAI_PIPELINES)  # the tasks OpenVINO GenAI has pipelines for
SHAPES = ("dynamic", "static")  # static: engines built with --static-shape HEIGHTxWIDTH (batch 1)
ROW_KEYS = ("task", "backend", "precision", "shape", "build_s", "load_s", "text_encoder_s", "unet_step_s", "unet_step_p90_s", "vae_decode_s", "e2e_s",
            "peak_rss_mb", "engine_mb", "unet_gflops", "roofline_fraction", "speedup_vs_baseline", "memory_vs_baseline")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str
    out: Path
    backends: tuple[str, ...] = ("onnxruntime",)
    precisions: tuple[str, ...] = ("fp32",)
    shapes: tuple[str, ...] = ("dynamic",)
    height: int = 512
    width: int = 512
    steps: int = 20
    scheduler: str = "dpmpp_2m"
    repeat: int = 1
    warmup: int = 1
    threads: int = 0
    baselines: tuple[str, ...] = ("diffusers",)  # () for none
    tasks: tuple[str, ...] = ("txt2img",)  # each configuration and baseline is timed on each, in its own process
    build_args: tuple[str, ...] = ()  # passed through to `sdrt build`
    variants: tuple[str, ...] = ()  # `sdrt generate` options, one string per variant: a row each after each configuration's own

    def __post_init__(self):
        if set(self.baselines) - set(BASELINES):
            raise SdrtError(f"--baseline {','.join(self.baselines)!r} is not supported: accepted values are {', '.join(BASELINES)} "
                            "(comma-separated), or none")
        if self.repeat < 1 or self.warmup < 0 or self.steps < 1:
            raise SdrtError("--repeat and --steps must be >= 1, --warmup >= 0")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise SdrtError(f"--tasks {','.join(self.tasks)!r} is not supported: accepted values are {', '.join(TASKS)} (comma-separated)")
        if not self.shapes or set(self.shapes) - set(SHAPES):
            raise SdrtError(f"--shapes {','.join(self.shapes)!r} is not supported: accepted values are {', '.join(SHAPES)}")
        for variant in self.variants:  # refused now, not after an hour of building
            try:
                parse_generate(["ENGINES", "--prompt", "p", "--output", "o.png", *shlex.split(variant)])
            except (SdrtError, ValueError) as exc:  # ValueError: shlex's unclosed quotes
                raise SdrtError(f"--generate-arg {variant!r} is not accepted: {exc}") from None


def _status(done: int, total: int, what: str, started: float) -> None:
    print(f"[{done}/{total}] {time.perf_counter() - started:7.1f} s  {what}", file=sys.stderr, flush=True)


def resolve_model(name_or_path: str) -> Path:
    """A model folder, or a named random-weight architecture generated once into the cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if name_or_path not in MODEL_NAMES:
        raise SdrtError(f"--model {name_or_path!r} is neither a model folder nor one of {', '.join(MODEL_NAMES)}")
    folder = cache_root() / "models" / name_or_path
    if not (folder / "model_index.json").is_file():
        from sdrt.exporters.random_models import make_random_model

        print(f"generating the {name_or_path} architecture with random weights into {folder}", file=sys.stderr)
        make_random_model(RANDOM_KIND[name_or_path], folder)
    return folder


@dataclasses.dataclass(frozen=True)
class Finished:
    """A child process's end: its exit status (negative: the signal that killed it), peak memory, log."""

    returncode: int
    peak_rss_mb: float
    stdout: str
    log: Path

    def reason(self) -> str:
        """How it failed, in one line: the exit status or signal, peak memory, and its last error line."""
        if self.returncode < 0:
            name = signal.Signals(-self.returncode).name
            how = f"killed by {name}" + (" (the out-of-memory killer sends it when memory runs out)" if name == "SIGKILL" else "")
        else:
            how = f"exit status {self.returncode}"
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if ERROR_LINE.match(line)]
        last = f": {errors[-1]}" if errors else ""
        return f"{how}, peak RSS {self.peak_rss_mb:.0f} MB{last} (log: {self.log})"


# lines that state an error, as opposed to warnings and progress that a dying process also prints
ERROR_LINE = re.compile(r"^(sdrt: (internal )?error: |[\w.]*(Error|Exception)\b|Killed\b|MemoryError)")


def run_logged(command: list[str], log: Path) -> Finished:
    """Run `command` with its stderr in `log`; -> how it ended, with that child's own peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return Finished(proc.returncode, usage.ru_maxrss / 1024, out.read(), log)


def _worker(args: dict, log: Path) -> dict:
    finished = run_logged([sys.executable, "-m", "sdrt.benchmarks.measure", json.dumps(args, default=str)], log)
    if finished.returncode != 0:
        raise SdrtError(f"benchmark worker {args['kind']} failed: {finished.reason()}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    names = ("sdrt", "numpy", "onnxruntime", "openvino", "nncf", "torch", "diffusers", "transformers", "onnx")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), None) \
        if Path("/proc/meminfo").exists() else None
    return {**cpu_description(), "ram_mb": mem, "platform": platform.platform(), "python": platform.python_version(), "versions": _versions()}


def _quality(variant: np.ndarray, default: np.ndarray) -> dict:
    """A variant's image against the same engines' image without it (same seed and settings)."""
    db = float(psnr(variant, default))
    return {"image_psnr_vs_default_db": None if db == float("inf") else db, "image_identical_to_default": bool(db == float("inf"))}


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def run(cfg: BenchConfig) -> dict:
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg.model)
    configs = [(b, p, s) for b in cfg.backends for p in cfg.precisions for s in cfg.shapes]
    diffusers_baselines = [b for b in cfg.baselines if BASELINES[b]]
    genai = "openvino-genai" in cfg.baselines
    total = 2 + (1 + len(cfg.tasks) * (1 + len(cfg.variants))) * len(configs) + len(diffusers_baselines) * len(cfg.tasks)
    total += genai * len([c for c in configs if c[0] == "openvino"]) * len(set(cfg.tasks) & set(GENAI_TASKS))
    done = 0
    common = {"height": cfg.height, "width": cfg.width, "steps": cfg.steps, "scheduler": cfg.scheduler, "repeat": cfg.repeat,
              "warmup": cfg.warmup, "threads": cfg.threads}
    _status(done, total, "measuring fp32 GEMM rate", started)
    logs, images = cfg.out / "logs", cfg.out / "images"
    images.mkdir(exist_ok=True)
    gemm = _worker({"kind": "gemm", "threads": cfg.threads}, logs / "gemm.log")["gemm_gflops"]
    done += 1
    _status(done, total, "counting U-Net FLOPs", started)
    unet_gflop = _worker({"kind": "flops", "model": model, "height": cfg.height, "width": cfg.width}, logs / "flops.log")["unet_gflop"]
    done += 1
    rows, skipped = [], []
    for baseline in diffusers_baselines:
        for task in cfg.tasks:
            dtype = BASELINES[baseline]
            _status(done, total, f"timing the {baseline} baseline (PyTorch eager {dtype}, {task})", started)
            rows.append({"task": task, "backend": "diffusers", "precision": dtype, "shape": "dynamic", "build_s": None, "engine_mb": None,
                         **_worker({"kind": "diffusers", "model": model, "dtype": dtype, "task": task, **common}, logs / f"{baseline}-{task}.log")})
            done += 1
    for backend, precision, shape in configs:
        name = config_name(backend, precision, shape)
        slug = name.replace(" ", "-")
        engines = cfg.out / "engines" / slug
        static = ["--static-shape", f"{cfg.height}x{cfg.width}"] if shape == "static" else []
        _status(done, total, f"building {name}", started)
        build_started = time.perf_counter()
        build = run_logged([sys.executable, "-m", "sdrt.cli", "build", str(model), "--out", str(engines), "--overwrite",
                            "--backend", backend, "--precision", precision, "--threads", str(cfg.threads), *static, *cfg.build_args],
                           logs / f"build-{slug}.log")
        build_s = time.perf_counter() - build_started
        done += 1
        if build.returncode != 0:
            skipped.append({"backend": backend, "precision": precision, "shape": shape, "reason": build.reason(),
                            "exit_status": build.returncode, "peak_rss_mb": build.peak_rss_mb, "log": str(build.log)})
            done += len(cfg.tasks) * (1 + len(cfg.variants))
            continue
        manifest = json.loads((engines / "manifest.json").read_text())
        accuracy = manifest.get("accuracy") or {}
        for task in cfg.tasks:
            _status(done, total, f"timing {name}, {task}", started)
            image = images / f"{slug}-{task}.npy"
            row = {"task": task, "backend": backend, "precision": precision, "shape": shape, "variant": "", "build_s": build_s,
                   "engine_mb": _folder_mb(engines),
                   **_worker({"kind": "sdrt", "engines": engines, "task": task, "image_out": image, **common}, logs / f"time-{slug}-{task}.log")}
            row["image_psnr_vs_fp32_db"] = None if accuracy.get("reference") else accuracy.get("min_image_psnr_db")
            row["build_cache"] = {"export": manifest["export_cache"], **{k: v["cache"] for k, v in manifest["components"].items()}}
            rows.append(row)
            done += 1
            for k, variant in enumerate(cfg.variants):
                _status(done, total, f"timing {name}, {task}, {variant}", started)
                variant_image = images / f"{slug}-{task}-variant{k}.npy"
                try:
                    timed = _worker({"kind": "sdrt", "engines": engines, "task": task, "image_out": variant_image,
                                     "generate_args": shlex.split(variant), **common}, logs / f"time-{slug}-{task}-variant{k}.log")
                except SdrtError as exc:  # e.g. an option these engines do not offer: the run goes on
                    skipped.append({"backend": backend, "precision": precision, "shape": shape, "task": task, "variant": variant, "reason": str(exc)})
                else:
                    rows.append({**{key: row[key] for key in ("task", "backend", "precision", "shape", "build_s", "engine_mb", "image_psnr_vs_fp32_db")},
                                 "variant": variant, **timed, **_quality(np.load(variant_image), np.load(image))})
                done += 1
            if genai and backend == "openvino" and task in GENAI_TASKS:
                _status(done, total, f"timing OpenVINO GenAI on {name}, {task}", started)
                if (manifest.get("openvino_genai") or {}).get("loadable"):
                    rows.append({**{k: row[k] for k in ("task", "precision", "shape", "engine_mb", "image_psnr_vs_fp32_db")},
                                 "backend": "openvino-genai", "build_s": None,
                                 **_worker({"kind": "openvino-genai", "engines": engines, "task": task, **common},
                                           logs / f"time-genai-{slug}-{task}.log")})
                else:
                    skipped.append({"backend": "openvino-genai", "precision": precision, "shape": shape, "task": task,
                                    "reason": (manifest.get("openvino_genai") or {}).get("why", "built before sdrt wrote OpenVINO GenAI folders")})
                done += 1
    baselines = {r["task"]: r for r in rows if (r["backend"], r["precision"]) == ("diffusers", BASELINES["diffusers"])}
    for row in rows:
        baseline = baselines.get(row["task"])
        row["unet_gflops"] = None if row.get("variant") else unet_gflop / row["unet_step_s"]  # a variant may run other batches
        row["roofline_fraction"] = row["unet_gflops"] and row["unet_gflops"] / gemm
        row["speedup_vs_baseline"] = baseline["e2e_s"] / row["e2e_s"] if baseline else None
        row["memory_vs_baseline"] = row["peak_rss_mb"] / baseline["peak_rss_mb"] if baseline else None
    results = {
        "machine": machine(),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}, "model_path": str(model),
                   "unet_gflop_per_step": unet_gflop, "date": time.strftime("%Y-%m-%d")},
        "gemm_gflops": gemm,
        "rows": rows,
        "skipped": skipped,
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_report(results, cfg.out)
    _status(total, total, f"done: {cfg.out / 'results.json'}, report.md, report.png", started)
    return results
