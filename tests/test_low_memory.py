"""--low-memory: one component open at a time, and the VAE decoded in tiles as diffusers' enable_tiling does."""

import numpy as np
import pytest

from conftest import picture, psnr
from helpers import generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.engines.base import engine_class  # noqa: E402
from sdrt.image_io import read_metadata  # noqa: E402
from sdrt.pipeline import GenerateRequest, StableDiffusion  # noqa: E402
from sdrt.tiling import VaeTiledDecoder  # noqa: E402

MIN_PSNR = 40.0  # the issue's bar for tiled decoding against diffusers'
PROMPT, NEGATIVE, SEED = "a lighthouse at dusk", "blurry", 42


def test_tiled_decoding_matches_diffusers_enable_tiling(tiny_models, tiny_engines):
    """Latents of 24x36 on a VAE whose tiles are 8 latent pixels (sample_size 16, scale 2): 4x6 tiles, each blended."""
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_models["sd1"] / "vae")
    assert vae.tile_latent_min_size == 8, "the tiny VAE's tile changed: pick latents several tiles large"
    latents = np.random.default_rng(0).standard_normal((1, 4, 24, 36)).astype(np.float32)
    vae.enable_tiling()
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).sample.numpy()
        vae.disable_tiling()
        whole = vae.decode(torch.from_numpy(latents)).sample.numpy()
    pipe = StableDiffusion.from_engine_folder(tiny_engines["sd1"])
    try:
        decoder = VaeTiledDecoder(pipe.engine("vae_decoder"), pipe.info.vae_sample_size, pipe.info.vae_scale_factor)
        got = decoder.run({"latent_sample": latents})["sample"]
    finally:
        pipe.close()
    as_image = lambda x: ((np.clip(x / 2 + 0.5, 0, 1)) * 255).round().astype(np.uint8)  # noqa: E731
    assert got.shape == expected.shape == (1, 3, 48, 72)
    assert psnr(as_image(got), as_image(expected)) >= MIN_PSNR, psnr(as_image(got), as_image(expected))
    assert psnr(as_image(got), as_image(whole)) < 35, "tiling changed nothing: the comparison would prove nothing"


@pytest.mark.slow
def test_low_memory_image_matches_diffusers_with_tiling(tiny_models, tiny_engines):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.vae.enable_tiling()
    settings = dict(num_inference_steps=10, guidance_scale=7.5, height=48, width=64)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED), output_type="np", **settings).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    pipe = StableDiffusion.from_engine_folder(tiny_engines["sd1"], low_memory=True)
    try:
        got = pipe.generate(GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=10, guidance=7.5, height=48,
                                            width=64), progress=False)[0]
        assert pipe.engines == {}, "low memory: nothing stays open between generations"
    finally:
        pipe.close()
    assert expected.std() > 2
    assert psnr(got, expected) >= MIN_PSNR, psnr(got, expected)


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_low_memory_holds_one_component_at_a_time(task, tiny_engines, monkeypatch):
    """The backend's own load and close counted around the real engines: at most one open at once with --low-memory,
    more without (so that the count can fail); and the U-Net's batches: the guidance halves one at a time."""
    backend = engine_class("onnxruntime")
    open_now, most, unet_batches = set(), {"value": 0}, []
    real_load = backend.load.__func__

    def counting_load(cls, component_dir, spec, cfg):
        engine = real_load(cls, component_dir, spec, cfg)
        real_close, real_run = engine.close, engine.run
        if spec.name == "unet":
            engine.run = lambda feeds: unet_batches.append(len(feeds["sample"])) or real_run(feeds)

        def close():
            open_now.discard(id(engine))
            real_close()
        engine.close = close
        open_now.add(id(engine))
        most["value"] = max(most["value"], len(open_now))
        return engine

    monkeypatch.setattr(backend, "load", classmethod(counting_load))
    extra = {"init_image": picture(32, 32), "strength": 0.7} if task == "img2img" else {}
    for low_memory, allowed in ((True, 1), (False, None)):
        most["value"] = 0
        unet_batches.clear()
        pipe = StableDiffusion.from_engine_folder(tiny_engines["sd1"], low_memory=low_memory)
        try:
            pipe.generate(GenerateRequest(prompt=PROMPT, steps=3, seed=SEED, **extra), progress=False)
        finally:
            pipe.close()
        assert not open_now, "an engine was left open"
        if allowed:
            assert most["value"] == allowed, most
        else:
            assert most["value"] >= 3, most
        assert set(unet_batches) == ({1} if low_memory else {2}), unet_batches


def test_low_memory_image_equals_the_default_where_no_tile_is_needed(tiny_engines):
    """At the VAE's own size nothing is tiled: the same image as the default mode, to the bit."""
    images = [generate(tiny_engines["sd1"], {"low_memory": low_memory}, prompt=PROMPT, steps=4, seed=SEED)[0] for low_memory in (False, True)]
    assert np.array_equal(*images)


def test_low_memory_from_the_command_line(tiny_engines, tmp_path, capsys):
    out = tmp_path / "a.png"
    result = in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", PROMPT, "--steps", "2", "--low-memory", "--guidance-cutoff",
                        "0.5", "--height", "48", "--width", "48", "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    metadata = read_metadata(out)
    assert metadata["low_memory"] is True and metadata["guidance_cutoff"] == 0.5
