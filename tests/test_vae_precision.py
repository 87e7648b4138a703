"""--vae-precision: the VAE decoder's compute type chosen at load, apart from the U-Net's."""

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

ov = pytest.importorskip("openvino")

from sdrt.image_io import read_metadata  # noqa: E402

NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _image(engines, vae_precision):
    return generate(engines, {"vae_precision": vae_precision}, steps=4, height=32, width=32)[0]


@pytest.mark.skipif(not NATIVE_BF16, reason="openvino reports no native bf16 on this CPU (needs AVX512_BF16 or AMX)")
def test_bf16_decoder_on_fp32_engines_is_close_but_not_the_same(openvino_engines, tmp_path, capsys):
    engines = openvino_engines("sd1", "fp32")
    fp32, bf16 = _image(engines, None), _image(engines, "bf16")
    assert np.array_equal(_image(engines, "fp32"), fp32)  # fp32 is these engines' own compute type
    assert not np.array_equal(bf16, fp32), "bf16 changed nothing: the decoder did not run in bf16"
    assert psnr(bf16, fp32) >= 30, psnr(bf16, fp32)  # bf16 keeps 8 bits of mantissa; the image barely moves
    out = tmp_path / "a.png"
    result = in_process(capsys, "generate", engines, "--prompt", "x", "--steps", "2", "--vae-precision", "bf16", "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert read_metadata(out)["vae_precision"] == "bf16"


@pytest.mark.parametrize("value,fragments", [("bf16", ("--vae-precision bf16 is not available with onnxruntime engines",)),
                                             ("fp8", ("--vae-precision 'fp8' is not supported", "fp32, bf16"))])
def test_vae_precision_the_engines_cannot_give_is_refused(value, fragments, tiny_engines, tmp_path, capsys):
    result = in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--vae-precision", value,
                        "--output", tmp_path / "a.png")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "a.png").exists()
