"""`sdrt generate-batch`: one PNG per line of a JSON Lines file, in one process or on Ray.

Line N (1-based, blank lines count) becomes `OUT/NNNNN.png`, written in one step (`image_io.save_png`), so a
file that exists is finished: a run that was stopped is resumed by running the same command again, and only
the missing images are made. Lines that fail are recorded in `OUT/failures.jsonl` (rewritten by each run) and
tried again by the next. `OUT/batch.json` ties the folder to its prompts file and engines: another batch is
refused there instead of mixing its images with this one's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SdrtError, as_field
from .files import remove_leftovers

STRINGS = ("prompt", "negative_prompt", "scheduler")
INTEGERS = ("steps", "seed", "height", "width", "noise_level", "tile", "cache_interval")
NUMBERS = ("guidance", "strength", "mask_blur", "guidance_cutoff")
FILES = ("init_image", "image", "mask", "depth_map")  # paths, relative to the prompts file's folder
FIELDS = (*STRINGS, *INTEGERS, *NUMBERS, "karras", *FILES)
RECORD = "batch.json"
FAILURES = "failures.jsonl"


@dataclasses.dataclass(frozen=True)
class Item:
    line: int  # 1-based line of the prompts file; the image is OUT/{line:05d}.png
    fields: dict[str, Any]  # the line's JSON object, checked against FIELDS; "seed" always present


def read_items(path: Path, first_seed: int) -> list[Item]:
    """Every non-blank line of `path` as an Item; a line without "seed" gets first_seed + (line - 1).
    Any malformed line is an SdrtError naming it, before anything runs."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrtError(f"prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    items = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SdrtError(f"{where}: not JSON ({exc.msg}); each line is an object such as "
                            '{"prompt": "a red circle", "seed": 1}') from None
        if not isinstance(fields, dict):
            raise SdrtError(f"{where}: a line is a JSON object, not {type(fields).__name__}")
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise SdrtError(f"{where}: unknown field {unknown[0]!r}; accepted: {', '.join(FIELDS)}")
        for name, value in fields.items():
            _check_type(where, name, value)
        if "prompt" not in fields and "image" not in fields:
            raise SdrtError(f"{where}: \"prompt\" is required (only upscaling and unCLIP, given \"image\", can do without)")
        fields.setdefault("seed", first_seed + line - 1)
        if not 0 <= fields["seed"] < 2**32:
            raise SdrtError(f"{where}: seed {fields['seed']} is out of range 0 .. {2**32 - 1}")
        items.append(Item(line, fields))
    if not items:
        raise SdrtError(f"prompts file {path} has no lines")
    return items


def _check_type(where: str, name: str, value: Any) -> None:
    kinds = {**dict.fromkeys(STRINGS + FILES, (str,)), **dict.fromkeys(INTEGERS, (int,)), **dict.fromkeys(NUMBERS, (int, float)),
             "karras": (bool,)}[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kinds[-1]]
        raise SdrtError(f"{where}: {name} must be {wanted}, not {json.dumps(value)}")


def image_path(out: Path, item: Item) -> Path:
    return out / f"{item.line:05d}.png"


def prepare_folder(out: Path, prompts: Path, model_hash: str) -> None:
    """Create OUT, or check that it holds this batch (same prompts file content, same engines)."""
    record = {"prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(), "model_hash": model_hash}
    if out.exists() and not out.is_dir():
        raise SdrtError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out, ".", ".tmp")  # half-written PNGs of a run that was killed
    path = out / RECORD
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = None
        if found != record:
            what = "another prompts file" if not found or found.get("prompts_sha256") != record["prompts_sha256"] else "other engines"
            raise SdrtError(f"--out {out} holds the images of a batch made from {what}: give another --out (its images would "
                            "count as this batch's)")
    path.write_text(json.dumps(record, indent=1) + "\n")


def request(fields: dict[str, Any], base: Path):
    """A line's fields -> GenerateRequest (image files read from `base`, the prompts file's folder)."""
    from .depth import load_depth_map
    from .image_input import load_image
    from .pipeline import GenerateRequest

    values = {k: v for k, v in fields.items() if k not in FILES}
    for name in FILES:
        if name in fields:
            path = base / fields[name]
            values[name] = load_depth_map(path) if name == "depth_map" else load_image(path, name)
    return GenerateRequest(**{"prompt": "", **values})


class ItemRunner:
    """Makes one line's image with a pipeline it holds (in this process, or as a Ray actor)."""

    def __init__(self, engines: str, threads: int, verify: str):
        from .pipeline import StableDiffusion

        self.pipe = StableDiffusion.from_engine_folder(Path(engines), threads=threads, verify=verify)

    def model_hash(self) -> str:
        from .manifest import model_hash

        return model_hash(self.pipe.manifest)

    def run(self, item: Item, base: str) -> tuple[Item, np.ndarray | None, dict | str]:
        """-> (item, (H, W, 3) uint8 image and its metadata) or (item, None, the error)."""
        try:
            req = request(item.fields, Path(base))
            return item, self.pipe.generate(req, progress=False)[0], self.pipe.metadata(req, 0)
        except Exception as exc:  # recorded in failures.jsonl; the batch goes on  # noqa: BLE001
            return item, None, as_field(exc) if isinstance(exc, SdrtError) else f"{type(exc).__name__}: {exc}"


def run_batch(items: list[Item], out: Path, results: Callable[[list[Item]], Iterable[tuple[Item, np.ndarray | None, dict | str]]],
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[int, int, list[dict]]:
    """Make the images of `items` not yet in `out` (results() yields them, in any order) and record failures.
    -> (written, already there, failures)."""
    from .image_io import save_png

    pending = [item for item in items if not image_path(out, item).exists()]
    done_before = len(items) - len(pending)
    if done_before:
        log(f"{done_before} of {len(items)} images already in {out}: making the other {len(pending)}")
    written, failures = 0, []
    for item, image, meta in results(pending):
        if image is None:
            failures.append({"line": item.line, "error": meta})
            log(f"line {item.line}: {meta}")
            continue
        save_png(image, image_path(out, item), meta)
        written += 1
        log(f"{image_path(out, item)} ({done_before + written}/{len(items)})")
    _write_failures(out, failures)
    return written, done_before, failures


def _write_failures(out: Path, failures: list[dict]) -> None:
    path = out / FAILURES
    if failures:
        path.write_text("".join(json.dumps(f) + "\n" for f in sorted(failures, key=lambda f: f["line"])))
    else:
        path.unlink(missing_ok=True)


def local_results(runner: ItemRunner, base: Path) -> Callable[[list[Item]], Iterator]:
    return lambda pending: (runner.run(item, str(base)) for item in pending)


def ray_results(engines: Path, base: Path, workers: int, threads: int, verify: str, address: str | None):
    """-> (model hash, results function) with `workers` Ray actors, each holding a pipeline; results arrive as they finish."""
    from .raycluster import connect

    ray = connect(address)
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=threads)(ItemRunner)
    actors = [actor.remote(str(engines), threads, verify) for _ in range(workers)]
    model_hash = ray.get(actors[0].model_hash.remote())
    pool = ActorPool(actors)
    return model_hash, lambda pending: pool.map_unordered(lambda a, item: a.run.remote(item, str(base)), pending)
