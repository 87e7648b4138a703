"""ONNX Runtime engines: CPU by default; CUDA and TensorRT execution providers with --device.

At build time the graph is optimised once (all graph optimisations, for the target device) and
saved beside the portable ONNX file, so that loading skips optimisation.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.components import UNET_PASSES, ComponentSpec
from sdrt.cpu import usable_cores
from sdrt.errors import SdrtError
from sdrt.model_info import ModelInfo

from .base import BuildConfig, LoadConfig, check_feeds
from .cache import BuildCache

DEVICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PRECISIONS = ("fp32", "int8")
EXTERNAL_DATA_MIN_BYTES = 1024
# Components whose weights MLAS repacks at load for faster GEMMs: those that run every denoising step. Prepacking is
# most of a warm load (SD 1.5: U-Net 1.3 s, text encoder 0.4 s) and pays back only over many runs: the text encoder
# runs 0.025 s (15%) slower per prompt without it, the U-Net ~4% per step (README, Engine folder).
PREPACKED = UNET_PASSES


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


def _tensors(graph) -> Iterator:
    """Every tensor a graph holds: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def external_data_locations(graph_path: Path) -> list[str]:
    """The external-data file names a graph's tensors point to, refused unless each is a plain name
    inside the graph's folder (ONNX Runtime would read them beside the graph)."""
    import onnx

    if not graph_path.is_file() or graph_path.stat().st_size == 0:
        return []  # the hash check that follows reports it
    with graph_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        if raw.find(b"location") < 0:  # every external-data entry holds this key verbatim: none here, nothing to parse
            return []
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others
        raise SdrtError(f"{graph_path} is not a readable ONNX graph ({exc}); rebuild the engines with `sdrt build`") from None
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    for name in locations:
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise SdrtError(f"{graph_path} reads external data from {name!r}, outside its folder; rebuild the engines with `sdrt build`")
    return sorted(locations)


def optimized_name(device: str) -> str:
    return f"model.{device}-optimized.onnx"


_arena_lock = threading.Lock()
_arena_registered = False  # whether this process has registered its CPU arena with ONNX Runtime's environment


def _share_arena(options: ort.SessionOptions) -> None:
    """One CPU arena for every session of the process instead of one each: a pipeline's peak is then its largest
    component's working memory, not the sum (SD 1.5 at 512x512 with step caching: 9.5 -> 6.2 GB, same image; README,
    Engine folder)."""
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def _session_options(threads: int, shared_arena: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if shared_arena:
        _share_arena(options)
    options.intra_op_num_threads = threads or usable_cores()  # ONNX Runtime's own default ignores the CPU affinity
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no memory pattern: with it, every run after the first holds one block sized for all its planned tensors
    # (SD 1.5 U-Net at 512x512: peak 7.85 GB instead of 5.6 GB, same step time; README, Engine folder)
    options.enable_mem_pattern = False
    return options


class OnnxRuntimeEngine:
    artifact_layout = 2  # 2: weights always in model.{device}-optimized.onnx.data

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
            raise SdrtError(f"--precision {cfg.precision} is not available for onnxruntime: accepted values are {', '.join(PRECISIONS)} "
                            "(fp16, bf16 and int8-weights: use --backend openvino)")
        if cfg.static_shape:
            raise SdrtError("--static-shape is supported by --backend openvino only")
        _providers(cfg.device)

    @classmethod
    def needs_calibration(cls, component: str, cfg: BuildConfig) -> bool:
        return cfg.precision == "int8" and cfg.int8_method == "static" and component in UNET_PASSES

    @classmethod
    def build(cls, onnx_path: Path, spec: ComponentSpec, cfg: BuildConfig, static_sizes: dict[str, int] | None = None,
              calibration: list[dict[str, np.ndarray]] | None = None) -> list[Path]:
        """fp32: the portable graph, optimised. int8: the U-Net quantized (static QDQ from recorded
        inputs, or dynamic), the text encoder dynamically quantized, the VAE kept in fp32 (its
        convolutions lose quality and gain no speed as ConvInteger on the CPU)."""
        cls.check(cfg)
        source = onnx_path
        if cfg.precision == "int8" and spec.name in (*UNET_PASSES, "text_encoder"):
            from .quantize_onnx import quantize_dynamic_int8, quantize_static_int8

            if cls.needs_calibration(spec.name, cfg):
                source = quantize_static_int8(onnx_path, calibration or [], cfg.int8_ignore)
            else:
                source = quantize_dynamic_int8(onnx_path, cfg.int8_ignore)
        providers = _providers(cfg.device)
        target = onnx_path.parent / optimized_name(cfg.device)
        data_name = target.name + ".data"
        options = _session_options(cfg.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3  # the artifact is CPU-specific on purpose: it is named for its device
        # weights in a file of their own, whatever the model's size: ONNX Runtime maps such a file instead of parsing
        # the weights out of the protobuf, which loads an SD U-Net about 3x faster (README, Engine folder)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_DATA_MIN_BYTES))
        try:
            ort.InferenceSession(str(source), options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise SdrtError(f"onnxruntime could not build {spec.name}: {exc}") from None
        if source != onnx_path:  # the quantized graph lives on in the optimised artifact
            for p in (source, source.with_name(source.name + ".data")):
                p.unlink(missing_ok=True)
        return [p for p in (target, target.parent / data_name) if p.exists()]

    @classmethod
    def compute_type(cls, precision: str, device: str) -> str:
        return "f32"  # int8 builds: int8 where quantized, f32 elsewhere

    @classmethod
    def load_graph(cls, path: Path, spec: ComponentSpec, cfg: LoadConfig) -> "OnnxRuntimeEngine":
        """A session on any ONNX file (the build's fp32 reference uses the portable graphs), with an arena of its own:
        the shared one keeps what it took for the life of the process, and the build gives the reference's memory
        back before it quantizes (SD 1.5 U-Net at 512x512: 3.4 GB kept after close with the shared arena, none without)."""
        options = _session_options(cfg.threads, shared_arena=False)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return cls(ort.InferenceSession(str(path), options, providers=_providers(cfg.device)), spec)

    @staticmethod
    def _artifact(component_dir: Path, device: str) -> Path:
        """The graph optimised for `device` at build time, else the portable graph."""
        optimized = component_dir / optimized_name(device)
        return optimized if optimized.exists() else component_dir / "model.onnx"

    @classmethod
    def write_interop(cls, folder: Path, model_dir: Path, info: ModelInfo, scheduler_config: dict, scheduler: str,
                      cfg: BuildConfig, cache: BuildCache) -> dict:
        return {}  # every component's portable model.onnx is what other ONNX Runtime programs load

    @classmethod
    def files_to_load(cls, component_dir: Path, cfg: LoadConfig) -> list[Path]:
        """The graph and every external-data file its tensors name, whatever the names."""
        artifact = cls._artifact(component_dir, cfg.device)
        return [artifact, *(component_dir / name for name in external_data_locations(artifact))]

    @classmethod
    def load(cls, component_dir: Path, spec: ComponentSpec, cfg: LoadConfig) -> "OnnxRuntimeEngine":
        providers = _providers(cfg.device)
        options = _session_options(cfg.threads)
        artifact = cls._artifact(component_dir, cfg.device)
        prebuilt = artifact.name == optimized_name(cfg.device)
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if prebuilt else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        if spec.name not in PREPACKED:
            options.add_session_config_entry("session.disable_prepacking", "1")
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
