"""The Engine protocol, build/load configuration, and the registry of backends.

Backend names appear only in this package and in the CLI: the pipeline sees `Engine`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sdrt.components import ComponentSpec
from sdrt.errors import SdrtError
from sdrt.model_info import ModelInfo

from .cache import BuildCache

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-weights")
INT8_METHODS = ("static", "dynamic")

# backend name -> "module:class", imported only when that backend is used
BACKENDS = {
    "onnxruntime": "sdrt.engines.onnxruntime:OnnxRuntimeEngine",
    "openvino": "sdrt.engines.openvino:OpenVinoEngine",
}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int = 0  # 0: the backend's default (all physical cores)
    static_shape: tuple[int, int] | None = None  # (height, width): engines for that image size only
    batch: int = 1  # images per prompt, with static shapes
    calibration_prompts: int = 4  # int8: prompts whose U-Net inputs calibrate activation ranges
    calibration_steps: int = 10
    reference_size: tuple[int, int] | None = None  # (height, width) of calibration and accuracy runs; None: model default
    int8_method: str = "static"  # onnxruntime int8: static QDQ (calibrated) or dynamic
    smooth_quant_alpha: float | None = None  # openvino int8: SmoothQuant strength; None: off
    int8_ignore: tuple[str, ...] = ()  # regex patterns of node names kept in float
    accuracy_prompts: int = 2  # prompts of the build's accuracy check; 0 skips it
    accuracy_steps: int = 10
    min_psnr: float | None = None  # fail the build below this image PSNR against fp32
    cache_branch: int | None = None  # step caching (DeepCache): also a U-Net feature output and its shallow pass, unet_shallow

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SdrtError(f"--backend {self.backend!r} is not supported: accepted values are {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise SdrtError(f"--precision {self.precision!r} is not supported: accepted values are {', '.join(PRECISIONS)}")
        if self.int8_method not in INT8_METHODS:
            raise SdrtError(f"--int8-method {self.int8_method!r} is not supported: accepted values are {', '.join(INT8_METHODS)}")
        for option, value, low in (("--threads", self.threads, 0), ("--batch", self.batch, 1), ("--calibration-prompts", self.calibration_prompts, 1),
                                   ("--calibration-steps", self.calibration_steps, 1), ("--accuracy-prompts", self.accuracy_prompts, 0),
                                   ("--accuracy-steps", self.accuracy_steps, 1)):
            if value < low:
                raise SdrtError(f"{option} {value} must be >= {low}")

    def cache_fields(self) -> dict[str, Any]:
        """What an engine's artifacts depend on (threads and the accuracy check do not)."""
        fields = dataclasses.asdict(self)
        for key in ("threads", "accuracy_prompts", "accuracy_steps", "min_psnr"):
            fields.pop(key)
        return fields


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    device: str = "cpu"
    threads: int = 0
    precision: str = "fp32"  # the engine folder's build precision: backends that pick a compute type at load need it


class Engine(Protocol):
    artifact_layout: int  # bumped when what `build` writes changes (its files or how they are made): older build-cache entries are not reused

    @classmethod
    def version(cls) -> str: ...

    @classmethod
    def check(cls, cfg: BuildConfig) -> None:
        """Raise SdrtError, before any export work, if this backend cannot build `cfg` here."""

    @classmethod
    def needs_calibration(cls, component: str, cfg: BuildConfig) -> bool:
        """Whether `build` of this component wants recorded real inputs."""

    @classmethod
    def compute_type(cls, precision: str, device: str) -> str:
        """What the engines' float arithmetic runs in on `device` (e.g. "f32", "bf16"): part of what an
        accuracy report depends on, recorded in the manifest."""

    @classmethod
    def build(cls, onnx_path: Path, spec: ComponentSpec, cfg: BuildConfig, static_sizes: dict[str, int] | None = None,
              calibration: list[dict[str, np.ndarray]] | None = None) -> list[Path]:
        """Turn an exported graph into this backend's artifacts beside it; returns their paths.
        `static_sizes` fixes the dynamic dims; `calibration` holds recorded inputs of the component."""

    @classmethod
    def write_interop(cls, folder: Path, model_dir: Path, info: ModelInfo, scheduler_config: dict, scheduler: str,
                      cfg: BuildConfig, cache: BuildCache) -> dict[str, Any]:
        """Write, beside the built engines in `folder`, what other runtimes need to load them (links
        rather than copies of weights) -> manifest fields: "links" ({path: target path}) and a record per
        runtime; {} where there is nothing to add. `scheduler` is the one sdrt generates with by default;
        `cache` keeps what is slow to remake."""

    @classmethod
    def files_to_load(cls, component_dir: Path, cfg: LoadConfig) -> list[Path]:
        """The files `load` will read, so that their hashes can be checked first."""

    @classmethod
    def load(cls, component_dir: Path, spec: ComponentSpec, cfg: LoadConfig) -> "Engine": ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; the caller owns the returned arrays."""

    def close(self) -> None: ...


def engine_class(backend: str) -> type[Engine]:
    if backend not in BACKENDS:
        raise SdrtError(f"backend {backend!r} is not supported: accepted values are {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SdrtError(f"backend {backend!r} needs a package that is not installed ({exc.name}); "
                        f"install it, e.g. pip install 'sdrt[{backend}]'") from None
    return getattr(module, class_name)


def check_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Names, dtypes and fixed dims of the inputs, checked before they reach a backend."""
    for t in spec.inputs:
        if t.name not in feeds:
            raise SdrtError(f"{spec.name}: input {t.name!r} is missing")
        array = feeds[t.name]
        if array.dtype != np.dtype(t.dtype) or array.ndim != len(t.dims):
            raise SdrtError(f"{spec.name}: input {t.name!r} is {array.dtype}{list(array.shape)}, expected {t.dtype} with dims {list(t.dims)}")
        for size, dim in zip(array.shape, t.dims):
            if isinstance(dim, int) and size != dim:
                raise SdrtError(f"{spec.name}: input {t.name!r} has shape {list(array.shape)}, expected dims {list(t.dims)}")


def static_spec(spec: ComponentSpec, sizes: dict[str, int]) -> ComponentSpec:
    """The spec with its dynamic dims fixed to `sizes`."""
    def fix(tensors):
        return tuple(dataclasses.replace(t, dims=tuple(sizes.get(d, d) if isinstance(d, str) else d for d in t.dims)) for t in tensors)

    return dataclasses.replace(spec, inputs=fix(spec.inputs), outputs=fix(spec.outputs))
