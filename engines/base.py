"""The Engine protocol, build/load configuration, and the registry of backends.

Backend names appear only in this package and in the CLI: the pipeline sees `Engine`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from sdrt.components import ComponentSpec
from sdrt.errors import SdrtError

PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")

# backend name -> "module:class", imported only when that backend is used
BACKENDS = {
    "onnxruntime": "sdrt.engines.onnxruntime:OnnxRuntimeEngine",
}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int = 0  # 0: the backend's default (all physical cores)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SdrtError(f"--backend {self.backend!r} is not supported: accepted values are {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise SdrtError(f"--precision {self.precision!r} is not supported: accepted values are {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise SdrtError(f"--threads {self.threads} must be >= 0 (0: all physical cores)")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    device: str = "cpu"
    threads: int = 0


class Engine(Protocol):
    @classmethod
    def version(cls) -> str: ...

    @classmethod
    def check(cls, cfg: BuildConfig) -> None:
        """Raise SdrtError, before any export work, if this backend cannot build `cfg` here."""

    @classmethod
    def build(cls, onnx_path: Path, spec: ComponentSpec, cfg: BuildConfig) -> list[Path]:
        """Turn an exported graph into this backend's artifacts beside it; returns their paths."""

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
        raise SdrtError(f"backend {backend!r} needs a package that is not installed: {exc}") from None
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
