"""--vae-decoder: a diffusers AutoencoderTiny (TAESD) decodes instead of the VAE. The tests make their own
random-weight tiny decoder of the tiny model's latent shape; users bring the real one (madebyollin/taesd)."""

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.image_io import read_metadata  # noqa: E402

MIN_PSNR = 40.0  # the bar
PROMPT, SEED = "a lighthouse at dusk", 3


def tiny_decoder(folder, upsamples: int = 1):
    """An AutoencoderTiny decoding 4-channel latents 2**upsamples x up (the tiny sd1 model's VAE: 2x), random weights."""
    torch.manual_seed(0)
    blocks = (16,) * (upsamples + 1)
    model = diffusers.AutoencoderTiny(encoder_block_out_channels=blocks, decoder_block_out_channels=blocks,
                                      num_encoder_blocks=(1,) * len(blocks), num_decoder_blocks=(1,) * len(blocks), latent_channels=4)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_decoder_engines(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("taesd")
    from sdrt.cli import main

    assert main(["build", str(tiny_models["sd1"]), "--vae-decoder", str(tiny_decoder(out / "taesd")), "--out", str(out / "E"),
                 "--quiet", "--accuracy-prompts", "0"]) == 0
    return out / "E", out / "taesd"


@pytest.mark.slow
def test_tiny_decoder_image_matches_diffusers(tiny_models, tiny_decoder_engines):
    engines, decoder = tiny_decoder_engines
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None)
    ref.vae = diffusers.AutoencoderTiny.from_pretrained(decoder)
    ref.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=8, guidance_scale=7.5, height=32, width=48)
    expected = ref(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **settings).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    got = generate(engines, steps=8, guidance=7.5, height=32, width=48, scheduler="pndm")[0]
    assert expected.std() > 2, "reference image is flat: the comparison would prove nothing"
    assert psnr(got, expected) >= MIN_PSNR, psnr(got, expected)


@pytest.mark.slow
def test_tiny_decoder_is_recorded_and_differs_from_the_vae(tiny_engines, tiny_decoder_engines, tmp_path, capsys):
    engines, _ = tiny_decoder_engines
    out = tmp_path / "a.png"
    assert in_process(capsys, "generate", engines, "--prompt", PROMPT, "--steps", "4", "--output", out, "--quiet").returncode == 0
    assert read_metadata(out)["vae_decoder"] == "taesd"
    info = in_process(capsys, "info", engines)
    assert "decoded by taesd (AutoencoderTiny), not the VAE" in info.stdout
    with_vae = generate(tiny_engines["sd1"], steps=4)[0]
    with_tiny = generate(engines, steps=4)[0]
    assert psnr(with_tiny, with_vae) < 30, "the tiny decoder changed nothing: the parity test would prove nothing"


def test_a_tiny_decoder_of_another_scale_is_refused(tiny_models, tmp_path, capsys):
    result = in_process(capsys, "build", tiny_models["sd1"], "--vae-decoder", tiny_decoder(tmp_path / "taesd", upsamples=3),
                        "--out", tmp_path / "E", "--quiet")
    assert_clean_error(result, "--vae-decoder", "8x up", "2x up")
    assert not (tmp_path / "E").exists()
