"""OpenVINO engines: ONNX -> OpenVINO IR (model.xml + model.bin), compiled for CPU (or GPU/NPU
where OpenVINO reports them) with the LATENCY hint and OpenVINO's model cache.

Precisions (--precision):
  fp32          IR in fp32
  fp16          weights stored in fp16; computed in fp16 where the device has native fp16, else fp32
  bf16          weights stored in fp32, computed in bfloat16 (devices with native bf16 only:
                AVX512_BF16 or AMX on CPUs)
  int8-weights  every component: 8-bit weights (NNCF weight compression), fp32 compute
  int8          U-Net (and its shallow pass): NNCF post-training quantization on recorded inputs, hybrid as
                optimum-intel does it (8-bit weights for all MatMuls, int8 activations and weights
                for the rest); text encoder and VAE: 8-bit weights only
Every precision but bf16 computes its float parts in fp32: OpenVINO's own default on CPUs with
native bf16 is bf16, so sdrt sets INFERENCE_PRECISION_HINT at load (the IR does not carry it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import openvino as ov

from sdrt.components import UNET_PASSES, ComponentSpec
from sdrt.cpu import cpu_description, usable_cores
from sdrt.errors import SdrtError, first_line
from sdrt.files import locked
from sdrt.model_info import ModelInfo

from .base import BuildConfig, LoadConfig, check_feeds
from .cache import BuildCache, cache_root

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-weights")
XML, BIN = "model.xml", "model.bin"


def _device(name: str, core: ov.Core) -> str:
    available = core.available_devices
    wanted = name.upper()
    if not any(d == wanted or d.startswith(wanted + ".") for d in available):
        raise SdrtError(f"--device {name!r} is not available to openvino here: accepted values are "
                        f"{', '.join(sorted({d.split('.')[0].lower() for d in available}))}")
    return wanted


def _inference_precision(precision: str, device: str, core: ov.Core) -> str:
    """The compute type of the float parts of an engine built at `precision` (an OpenVINO element type name)."""
    capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16":
        if "BF16" not in capabilities:
            raise SdrtError(f"--precision bf16 needs native bf16 on the device: openvino's {device} reports {', '.join(capabilities)}; "
                            f"use fp32 or int8 here")
        return "bf16"
    return "f16" if precision == "fp16" and "FP16" in capabilities else "f32"


def _weighted_matmuls(model: ov.Model) -> list[str]:
    """MatMuls with a constant operand: their weights get 8-bit compression, activations stay fp32."""
    def constant(output) -> bool:
        node = output.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and any(constant(op.input_value(i)) for i in range(2))]


def _one_by_one(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Recorded inputs (batch b: with guidance, the unconditional and conditional halves) as b inputs of batch 1: half
    the working memory when NNCF runs them (SD 1.5 U-Net at 512x512: 9.7 -> 8.2 GB), the same activation ranges
    (their extremes over all inputs; checked: identical FakeQuantize ranges)."""
    return [{name: value[i : i + 1] for name, value in item.items()} for item in feeds for i in range(len(item["sample"]))]


_unwritable_caches: set[Path] = set()  # warned about once per process: a pipeline loads several components


def _model_cache() -> Path | None:
    """OpenVINO's compiled-model cache folder, or None (with a warning) where it cannot be written."""
    folder = cache_root() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        if folder not in _unwritable_caches:
            _unwritable_caches.add(folder)
            log.warning("openvino's model cache %s cannot be written (%s); compiling without it, so every load compiles "
                        "(set SDRT_CACHE_DIR to a writable folder)", folder, exc.strerror or exc)
        return None
    return folder


def _blob_lock(cache: Path, xml: Path) -> Path:
    """The lock file loads of this graph take turns on (processes and threads alike): one per graph text, so that a
    folder's components load side by side while two loads of the same graph never read a blob half written."""
    lock = cache / f"{hashlib.sha256(xml.read_bytes()).hexdigest()[:32]}.lock"
    lock.touch(exist_ok=True)
    return lock


@contextlib.contextmanager
def _nncf() -> Iterator:
    """NNCF, with its tables (logging), progress bars (rich, on stdout) and deprecation notes shown only
    when sdrt runs with --verbose, and then on stderr: stdout is the command's own output."""
    import nncf

    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    nncf.set_log_level(logging.INFO if verbose else logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()), warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield nncf


class OpenVinoEngine:
    artifact_layout = 3  # 3: int8 activation ranges are extremes over all inputs, calibrated one guidance half at a time

    def __init__(self, request: ov.InferRequest, spec: ComponentSpec):
        self._request = request
        self._spec = spec
        self._output_names = [t.name for t in spec.outputs]

    @classmethod
    def version(cls) -> str:
        return ov.get_version()

    @classmethod
    def check(cls, cfg: BuildConfig) -> None:
        if cfg.precision not in PRECISIONS:
            raise SdrtError(f"--precision {cfg.precision} is not available for openvino: accepted values are {', '.join(PRECISIONS)}")
        if cfg.precision in ("int8", "int8-weights"):
            try:
                import nncf  # noqa: F401
            except ImportError:
                raise SdrtError(f"--precision {cfg.precision} with openvino needs NNCF: pip install nncf") from None
        if cfg.int8_method != "static":
            raise SdrtError("--int8-method dynamic applies to --backend onnxruntime; openvino int8 is calibrated (static)")
        cls.compute_type(cfg.precision, cfg.device)

    @classmethod
    def compute_type(cls, precision: str, device: str) -> str:
        core = ov.Core()
        return _inference_precision(precision, _device(device, core), core)

    @classmethod
    def needs_calibration(cls, component: str, cfg: BuildConfig) -> bool:
        return cfg.precision == "int8" and component in UNET_PASSES

    @classmethod
    def build(cls, onnx_path: Path, spec: ComponentSpec, cfg: BuildConfig, static_sizes: dict[str, int] | None = None,
              calibration: list[dict[str, np.ndarray]] | None = None) -> list[Path]:
        cls.check(cfg)
        model = ov.convert_model(str(onnx_path))
        if static_sizes:
            model.reshape({t.name: ov.PartialShape([static_sizes[d] if isinstance(d, str) else d for d in t.dims]) for t in spec.inputs})
        if cfg.precision == "int8-weights" or (cfg.precision == "int8" and not cls.needs_calibration(spec.name, cfg)):
            model = cls._compress_weights(model, cfg)
        elif cfg.precision == "int8":
            model = cls._quantize_hybrid(model, spec, cfg, calibration if static_sizes else _one_by_one(calibration or []))
        elif cfg.precision == "fp16" and cfg.device == "cpu" and cls.compute_type("fp16", "cpu") == "f32":
            log.warning("fp16 on this CPU (%s) is storage only: weights are kept in fp16 and computed in fp32",
                        cpu_description()["model"])
        xml = onnx_path.parent / XML
        ov.save_model(model, str(xml), compress_to_fp16=cfg.precision == "fp16")
        return [xml, onnx_path.parent / BIN]

    @staticmethod
    def _compress_weights(model: ov.Model, cfg: BuildConfig) -> ov.Model:
        with _nncf() as nncf:
            ignored = nncf.IgnoredScope(patterns=list(cfg.int8_ignore), validate=False)
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)

    @staticmethod
    def _quantize_hybrid(model: ov.Model, spec: ComponentSpec, cfg: BuildConfig, calibration: list[dict[str, np.ndarray]]) -> ov.Model:
        if not calibration:
            raise SdrtError(f"int8 quantization of {spec.name} needs calibration inputs; none were recorded")
        matmuls = _weighted_matmuls(model)
        alpha = -1 if cfg.smooth_quant_alpha is None else cfg.smooth_quant_alpha
        with _nncf() as nncf:
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                          ignored_scope=nncf.IgnoredScope(types=["Convolution"], patterns=list(cfg.int8_ignore), validate=False))
            return nncf.quantize(
                model, nncf.Dataset(calibration), subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                ignored_scope=nncf.IgnoredScope(names=matmuls, patterns=list(cfg.int8_ignore), validate=False),
                # activation ranges: extremes over all inputs, not NNCF's default mean of each input's extremes (default
                # model with its ends in float: image PSNR vs fp32 26.2 -> 40.8 dB; README, Performance)
                advanced_parameters=nncf.AdvancedQuantizationParameters(
                    smooth_quant_alpha=alpha, activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
            )

    @classmethod
    def write_interop(cls, folder: Path, model_dir: Path, info: ModelInfo, scheduler_config: dict, scheduler: str,
                      cfg: BuildConfig, cache: BuildCache) -> dict:
        """The OpenVINO GenAI view of the folder (engines/openvino_genai.py)."""
        from .openvino_genai import write_view

        return write_view(folder, model_dir, info, scheduler_config, scheduler, cls.compute_type(cfg.precision, cfg.device),
                          static=cfg.static_shape is not None, step_cache=cfg.cache_branch is not None, cache=cache)

    @classmethod
    def files_to_load(cls, component_dir: Path, cfg: LoadConfig) -> list[Path]:
        return [component_dir / XML, component_dir / BIN]

    @classmethod
    def load(cls, component_dir: Path, spec: ComponentSpec, cfg: LoadConfig) -> "OpenVinoEngine":
        core = ov.Core()
        device = _device(cfg.device, core)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _inference_precision(cfg.precision, device, core)}
        config["INFERENCE_NUM_THREADS"] = cfg.threads or usable_cores()
        xml = str(component_dir / XML)
        cache = _model_cache()
        if cache is not None:
            try:
                with locked(_blob_lock(cache, component_dir / XML)):  # one writes a graph's blob, the others then read it
                    core.set_property({"CACHE_DIR": str(cache)})
                    return cls(core.compile_model(xml, device, config).create_infer_request(), spec)
            except RuntimeError as exc:
                log.warning("openvino could not use its model cache %s (%s); compiling without it", cache, first_line(exc))
                core = ov.Core()
        try:
            compiled = core.compile_model(xml, device, config)
        except RuntimeError as exc:
            raise SdrtError(f"openvino could not load {xml}: {first_line(exc)}; rebuild the engines with `sdrt build`") from None
        return cls(compiled.create_infer_request(), spec)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._spec, feeds)
        try:
            self._request.infer({name: np.ascontiguousarray(feeds[name]) for name in (t.name for t in self._spec.inputs)})
        except RuntimeError as exc:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise SdrtError(f"openvino failed to run {self._spec.name} on inputs {shapes}: {exc}") from None
        return {name: self._request.get_tensor(name).data.copy() for name in self._output_names}

    def close(self) -> None:
        self._request = None
