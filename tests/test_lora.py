"""LoRAs merged at build time: kohya/WebUI and diffusers/PEFT files give diffusers' fused image, the merge is
kohya's W + w * alpha / rank * up @ down, weight 0 gives the base image, a LoRA that fits no layer is refused."""

from pathlib import Path

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

MIN_PSNR = 60.0  # fp32 engines against diffusers (see test_tasks_parity)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's CLIPAttention and CLIPMLP layers


def kohya_lora(model: Path, path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0, bad_module: bool = False) -> Path:
    """A random LoRA in the kohya / WebUI format: lora_unet_* and lora_te_* modules with lora_down, lora_up, alpha."""
    from safetensors.torch import save_file

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    g, tensors = torch.Generator().manual_seed(seed), {}

    def add(name: str, weight: torch.Tensor):
        conv = [1, 1] if weight.ndim == 4 else []
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *conv, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *conv, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha)

    for name, module in pipe.unet.named_modules():
        if name.endswith(UNET_TARGETS):
            add("lora_unet_" + name.replace(".", "_"), module.weight)
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(TEXT_TARGETS):
            add("lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_"), module.weight)
    if bad_module:
        add("lora_unet_down_blocks_7_attentions_0_proj_in", torch.zeros(32, 32))
    save_file(tensors, str(path))
    return path


def peft_lora(model: Path, folder: Path) -> Path:
    """A random LoRA in diffusers' own format (PEFT adapters saved by save_lora_weights)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "out_proj"], init_lora_weights=False))
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.3)  # PEFT's own random init barely moves a tiny model's image
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    return folder / "pytorch_lora_weights.safetensors"


def _diffusers_image(model: Path, lora: Path, weight: float) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=weight)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a lighthouse at dusk", num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                 output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("kind,weight", [("kohya", 0.7), ("peft", 1.0)])
def test_lora_build_matches_diffusers_fused(kind, weight, tiny_models, tiny_engines, tmp_path, capsys):
    model = tiny_models["sd1"]
    lora = kohya_lora(model, tmp_path / "style.safetensors") if kind == "kohya" else peft_lora(model, tmp_path)
    result = in_process(capsys, "build", model, "--lora", f"{lora}:{weight}", "--out", tmp_path / "E", "--quiet")
    assert result.returncode == 0, result.stderr
    got = generate(tmp_path / "E", steps=10, scheduler="pndm")[0]
    expected = _diffusers_image(model, lora, weight)
    assert psnr(got, expected) >= MIN_PSNR
    base = generate(tiny_engines["sd1"], steps=10, scheduler="pndm")[0]
    assert psnr(got, base) < 35, "the LoRA changed nothing visible: the comparison would prove nothing"
    info = in_process(capsys, "info", tmp_path / "E").stdout
    assert f"LoRA {lora.name} merged at weight {weight:g}" in info
    assert in_process(capsys, "generate", tmp_path / "E", "--prompt", "x", "--steps", "2", "--output", tmp_path / "x.png", "--quiet").returncode == 0
    from PIL import Image

    with Image.open(tmp_path / "x.png") as im:
        assert f"LoRAs: {lora.name}:{weight:g}," in im.text["parameters"]


def test_merge_is_kohyas_formula_and_weight_zero_is_the_base_model(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from sdrt.exporters.model_source import SourceOptions, prepare_model

    model = tiny_models["sd1"]
    lora = kohya_lora(model, tmp_path / "style.safetensors", rank=4, alpha=2.0)
    base = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    tensors = load_file(str(lora))
    name, layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    for weight, work in ((0.6, tmp_path / "a"), (0.0, tmp_path / "b")):
        work.mkdir()
        folder, record = prepare_model(model, work, SourceOptions(loras=((lora, weight),)))
        merged = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        expected = base[f"{name}.weight"] + weight * 2.0 / 4 * tensors[f"{layer}.lora_up.weight"] @ tensors[f"{layer}.lora_down.weight"]
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        assert record["loras"] == [{"file": str(lora.resolve()), "name": "style.safetensors", "weight": weight}]
        if weight == 0.0:
            assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)


def test_a_lora_that_does_not_fit_the_model_is_refused(tiny_models, tmp_path, capsys):
    model = tiny_models["sd1"]
    stray = kohya_lora(model, tmp_path / "stray.safetensors", bad_module=True)
    result = in_process(capsys, "build", model, "--lora", stray, "--out", tmp_path / "E", "--quiet")
    assert_clean_error(result, f"--lora {stray}: ", "fit no layer of this model", "made for another architecture")
    wide = kohya_lora(tiny_models["sd2"], tmp_path / "wide.safetensors")  # SD 2's linear proj_in where SD 1 has a 1x1 convolution
    result = in_process(capsys, "build", model, "--lora", wide, "--out", tmp_path / "E", "--quiet")
    assert_clean_error(result, f"--lora {wide}: ", "size mismatch", "made for another architecture")
    for value, fragment in (("missing.safetensors", "no such file"),):
        assert_clean_error(in_process(capsys, "build", model, "--lora", tmp_path / value, "--out", tmp_path / "E"), fragment)
    assert not (tmp_path / "E").exists()
