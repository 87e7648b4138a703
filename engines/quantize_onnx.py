"""int8 quantization of ONNX graphs with onnxruntime.quantization (build time only)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from sdrt.errors import SdrtError


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._iter = iter(feeds)

    def get_next(self):
        return next(self._iter, None)


def _excluded(onnx_path: Path, patterns: tuple[str, ...]) -> list[str]:
    if not patterns:
        return []
    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    return [n.name for n in nodes if any(re.fullmatch(p, n.name) for p in patterns)]


def _own_external_data(onnx_path: Path) -> bool:
    """Whether the graph keeps its weights in external data; if so, that file becomes this folder's own.
    onnx refuses external data with several hard links, and the build links it from the export cache."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    if not data.exists():
        return False
    if data.stat().st_nlink > 1:
        copy = data.with_name(data.name + ".own")
        shutil.copyfile(data, copy)
        os.replace(copy, data)
    return True


def quantize_static_int8(onnx_path: Path, feeds: list[dict[str, np.ndarray]], ignore: tuple[str, ...]) -> Path:
    """QDQ int8: per-channel int8 weights, uint8 activations with ranges from recorded inputs.
    reduce_range keeps u8 x s8 products from saturating on CPUs without VNNI."""
    if not feeds:
        raise SdrtError("static int8 quantization needs calibration inputs; none were recorded")
    out = onnx_path.with_name("model.int8.onnx")
    quantize_static(str(onnx_path), str(out), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=_excluded(onnx_path, ignore), use_external_data_format=_own_external_data(onnx_path),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return out


def quantize_dynamic_int8(onnx_path: Path, ignore: tuple[str, ...]) -> Path:
    """Dynamic int8: weights quantized at build time, activation ranges computed per run."""
    out = onnx_path.with_name("model.int8.onnx")
    quantize_dynamic(str(onnx_path), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=_excluded(onnx_path, ignore),
                     use_external_data_format=_own_external_data(onnx_path))
    return out
