"""--vae: another VAE, as a diffusers folder or a single file in the original layout, gives diffusers' image
with that VAE swapped in; a VAE of another architecture is refused."""

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def other_vae(model, seed: int = 5):
    """The model's VAE architecture with other random weights."""
    vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae")
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return vae


@pytest.mark.slow
def test_swapped_vae_matches_diffusers(tiny_models, tiny_engines, tmp_path, capsys):
    from safetensors.torch import save_file

    from sdrt.exporters.original_layout import vae_keys

    model = tiny_models["sd1"]
    vae = other_vae(model)
    vae.save_pretrained(tmp_path / "vae-folder")
    single = tmp_path / "vae-ft.safetensors"  # standalone VAE files carry the original names without first_stage_model.
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_keys(vae).items()}, str(single))
    images = []
    for source, out in ((tmp_path / "vae-folder", "A"), (single, "B")):
        result = in_process(capsys, "build", model, "--vae", source, "--out", tmp_path / out, "--quiet")
        assert result.returncode == 0, result.stderr
        images.append(generate(tmp_path / out, steps=8, scheduler="euler")[0])
    assert np.array_equal(images[0], images[1])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, vae=vae)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = (ref("a lighthouse at dusk", num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0] * 255).round().astype(np.uint8)
    assert psnr(images[1], expected) >= 60
    assert psnr(images[1], generate(tiny_engines["sd1"], steps=8, scheduler="euler")[0]) < 40, "the VAE swap changed nothing"
    assert "VAE replaced by vae-ft.safetensors" in in_process(capsys, "info", tmp_path / "B").stdout


def test_a_vae_of_another_architecture_is_refused(tiny_models, tmp_path, capsys):
    from safetensors.torch import save_file

    from sdrt.exporters.original_layout import vae_keys

    sd2_vae = diffusers.AutoencoderKL.from_pretrained(tiny_models["sd2"], subfolder="vae")  # three levels where sd1's has two
    save_file({k: v.contiguous() for k, v in vae_keys(sd2_vae).items()}, str(tmp_path / "wide.safetensors"))
    sd2_vae.save_pretrained(tmp_path / "wide")
    for source in (tmp_path / "wide.safetensors", tmp_path / "wide", tmp_path / "missing.safetensors"):
        result = in_process(capsys, "build", tiny_models["sd1"], "--vae", source, "--out", tmp_path / "E", "--quiet")
        assert_clean_error(result, f"--vae {source}: ")
    assert not (tmp_path / "E").exists()
