"""ONNX Runtime engines: CPU by default; CUDA and TensorRT execution providers with --device.

At build time the graph is optimised once (all graph optimisations, for the target device) and
saved beside the portable ONNX file, so that loading skips optimisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.components import ComponentSpec
from sdrt.errors import SdrtError

from .base import BuildConfig, LoadConfig, check_feeds

DEVICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PRECISIONS = ("fp32",)
EXTERNAL_DATA_MIN_BYTES = 1024


def _providers(device: str) -> list[str]:
    if device not in DEVICES:
        raise SdrtError(f"--device {device!r} is not supported by onnxruntime: accepted values are {', '.join(DEVICES)}")
    wanted = DEVICES[device][0]
    if wanted not in ort.get_available_providers():
        raise SdrtError(
            f"--device {device} needs ONNX Runtime's {wanted}, which this installation lacks "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda/tensorrt"
        )
    return DEVICES[device]


def optimized_name(device: str) -> str:
    return f"model.{device}-optimized.onnx"


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OnnxRuntimeEngine:
    def __init__(self, session: ort.InferenceSession, spec: ComponentSpec):
        self._session = session
        self._spec = spec
        self._output_names = [t.name for t in spec.outputs]

    @classmethod
    def version(cls) -> str:
        return ort.__version__

    @classmethod
    def check(cls, cfg: BuildConfig) -> None:
        if cfg.precision not in PRECISIONS:
            raise SdrtError(f"--precision {cfg.precision} is not available for onnxruntime yet: accepted values are {', '.join(PRECISIONS)}")
        _providers(cfg.device)

    @classmethod
    def build(cls, onnx_path: Path, spec: ComponentSpec, cfg: BuildConfig) -> list[Path]:
        cls.check(cfg)
        providers = _providers(cfg.device)
        target = onnx_path.parent / optimized_name(cfg.device)
        data_name = target.name + ".data"
        options = _session_options(cfg.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3  # the artifact is CPU-specific on purpose: it is named for its device
        if (onnx_path.parent / "model.onnx.data").exists():
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_DATA_MIN_BYTES))
        try:
            ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise SdrtError(f"onnxruntime could not build {spec.name}: {exc}") from None
        return [p for p in (target, target.parent / data_name) if p.exists()]

    @staticmethod
    def _artifact(component_dir: Path, device: str) -> Path:
        """The graph optimised for `device` at build time, else the portable graph."""
        optimized = component_dir / optimized_name(device)
        return optimized if optimized.exists() else component_dir / "model.onnx"

    @classmethod
    def files_to_load(cls, component_dir: Path, cfg: LoadConfig) -> list[Path]:
        artifact = cls._artifact(component_dir, cfg.device)
        data = artifact.with_name(artifact.name + ".data")
        return [artifact, data] if data.exists() else [artifact]

    @classmethod
    def load(cls, component_dir: Path, spec: ComponentSpec, cfg: LoadConfig) -> "OnnxRuntimeEngine":
        providers = _providers(cfg.device)
        options = _session_options(cfg.threads)
        artifact = cls._artifact(component_dir, cfg.device)
        prebuilt = artifact.name == optimized_name(cfg.device)
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if prebuilt else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        try:
            session = ort.InferenceSession(str(artifact), options, providers=providers)
        except Exception as exc:
            raise SdrtError(f"onnxruntime could not load {artifact}: {exc}; rebuild the engines with `sdrt build`") from None
        return cls(session, spec)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._spec, feeds)
        try:
            outputs = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise SdrtError(f"onnxruntime failed to run {self._spec.name} on inputs {shapes}: {exc}") from None
        return dict(zip(self._output_names, outputs))

    def close(self) -> None:
        self._session = None
