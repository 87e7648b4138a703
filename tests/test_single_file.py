"""Single-file checkpoints in the original layout: written from random-weight models, read back by
diffusers exactly, built by sdrt into engines that draw diffusers' image for the same file; the
architectures sdrt detects; files that are refused."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.exporters import single_file  # noqa: E402
from sdrt.exporters.original_layout import clip_keys, open_clip_keys, original_state_dict, unet_keys, vae_keys  # noqa: E402

MIN_PSNR = 60.0  # fp32 engines against diffusers loading the same file (see test_tasks_parity: the tiny models answer weakly)
SHAPES_MODEL = Path(__file__).resolve().parents[1] / "models" / "sdrt-shapes"


def _pipeline(model: Path):
    import json

    cls = getattr(diffusers, json.loads((model / "model_index.json").read_text())["_class_name"])
    return cls.from_pretrained(model, safety_checker=None) if cls is diffusers.StableDiffusionPipeline else cls.from_pretrained(model)


def write_checkpoint(model: Path, path: Path, sd2: bool = False, fp16: bool = False, ema: bool = False) -> Path:
    """The model's weights in the original layout, as .safetensors or as a .ckpt the way training scripts save it;
    `fp16`: stored in half precision; `ema`: with EMA U-Net weights beside them (model_ema.*, LDM's flattened names)."""
    tensors = original_state_dict(_pipeline(model), sd2=sd2)
    if ema:
        g = torch.Generator().manual_seed(9)
        tensors.update({"model_ema." + "".join(k.split(".")[1:]): v + 0.05 * torch.randn(v.shape, generator=g)
                        for k, v in tensors.items() if k.startswith("model.diffusion_model.")})
    if fp16:
        tensors = {k: v.half() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"global_step": 1, "state_dict": tensors}, path)
    return path


def config_folder(model: Path, folder: Path) -> Path:
    """The model's diffusers folder without its weights: what --config takes."""
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1-inpaint"])
def test_original_layout_round_trips_through_diffusers(kind, tiny_models, tiny_inpaint_models, tmp_path):
    model = {**tiny_models, **tiny_inpaint_models}[kind]
    path = write_checkpoint(model, tmp_path / f"{kind}.safetensors", sd2=kind.startswith("sd2"))
    cls = diffusers.StableDiffusionInpaintPipeline if "inpaint" in kind else diffusers.StableDiffusionPipeline
    back = cls.from_single_file(str(path), config=str(config_folder(model, tmp_path / "config")), local_files_only=True)
    original = _pipeline(model)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.parametrize("kind,suffix,scheduler,guidance,half_ema", [
    ("sd1", ".safetensors", "dpmpp_2m", 7.5, False), ("sd2", ".ckpt", "euler", 1.0, False),
    ("sd1", ".safetensors", "pndm", 7.5, True),  # fp16, EMA weights beside the training weights, built with --ema
])
def test_checkpoint_build_matches_diffusers_loading_the_same_file(kind, suffix, scheduler, guidance, half_ema, tiny_models, tmp_path, capsys):
    from sdrt.schedulers import DIFFUSERS_CLASS_OF

    model = tiny_models[kind]
    path = write_checkpoint(model, tmp_path / f"model{suffix}", sd2=kind == "sd2", fp16=half_ema, ema=half_ema)
    config = config_folder(model, tmp_path / "config")
    result = in_process(capsys, "build", path, "--config", config, "--out", tmp_path / "E", "--quiet", *(["--ema"] if half_ema else []))
    assert result.returncode == 0, result.stderr
    ref = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True, extract_ema=half_ema,
                                                             torch_dtype=torch.float32)
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = (ref("a lighthouse at dusk", num_inference_steps=12, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0] * 255).round().astype(np.uint8)
    got = generate(tmp_path / "E", steps=12, guidance=guidance, scheduler=scheduler)[0]
    assert expected.std() > 2
    assert psnr(got, expected) >= MIN_PSNR
    info = in_process(capsys, "info", tmp_path / "E").stdout
    assert f"model:       {path.resolve()}" in info and "a single file read as --config" in info
    assert ("U-Net weights: EMA" if half_ema else "U-Net weights: the file's only") in info


def _meta_checkpoint(arch, drop: str | None = None, reshape: str | None = None) -> single_file.Checkpoint:
    """A full-size checkpoint of `arch` in the original layout, as shapes only (meta tensors): what detection reads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch.unet)
        vae = AutoencoderKL.from_config(arch.vae)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in arch.text_encoder.items() if k not in ("architectures", "model_type")}))
    sd2 = arch.text_encoder["hidden_size"] == 1024
    tensors = {**unet_keys(unet), **vae_keys(vae), **(open_clip_keys(text, extra_layer=True) if sd2 else clip_keys(text))}
    tensors = {k: torch.empty(v.shape, device="meta") for k, v in tensors.items() if k != drop}
    if reshape:
        tensors[reshape] = torch.empty((*tensors[reshape].shape[:-1], tensors[reshape].shape[-1] + 1), device="meta")
    return single_file.Checkpoint(Path(f"{arch.name}.safetensors"), tensors, {})


# the published parameter counts of the architectures' U-Nets, VAEs and text encoders
PUBLISHED = {"sd1": (859_520_964, 83_653_863, 123_060_480), "sd1-inpaint": (859_535_364, 83_653_863, 123_060_480),
             "sd2": (865_910_724, 83_653_863, 340_387_840)}


@pytest.mark.parametrize("name", list(single_file.ARCHITECTURES))
def test_full_size_architectures_are_detected_from_their_tensors(name):
    arch = single_file.ARCHITECTURES[name]
    detected = single_file.detect(_meta_checkpoint(arch))
    assert detected.name == ("sd2" if name == "sd2-v" else name)  # the two SD 2 text-to-image models differ only in what they predict
    single_file.check_tensors(_meta_checkpoint(arch), detected)
    if name in PUBLISHED:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            parts = (UNet2DConditionModel.from_config(arch.unet), AutoencoderKL.from_config(arch.vae),
                     CLIPTextModel(CLIPTextConfig(**{k: v for k, v in arch.text_encoder.items() if k not in ("architectures", "model_type")})))
        assert tuple(sum(p.numel() for p in part.parameters()) for part in parts) == PUBLISHED[name]


def test_a_checkpoint_missing_a_tensor_or_with_a_wrong_shape_is_refused_before_conversion():
    arch = single_file.ARCHITECTURES["sd1"]
    key = "model.diffusion_model.output_blocks.4.1.proj_in.weight"
    with pytest.raises(single_file.SdrtError, match="1 of the U-Net's 686 tensors are missing, e.g. " + key.replace(".", r"\.")):
        single_file.check_tensors(_meta_checkpoint(arch, drop=key), arch)
    vae_key = "first_stage_model.decoder.up.1.block.0.conv1.weight"
    with pytest.raises(single_file.SdrtError, match="has shape"):
        single_file.check_tensors(_meta_checkpoint(arch, reshape=vae_key), arch)


def test_the_prediction_probe_tells_a_trained_noise_predictor_from_a_v_predictor():
    """The default model's trained U-Net predicts noise; the same network rewritten to predict v (v = sqrt(a) eps -
    sqrt(1-a) x0, x0 from its own eps) must read as v."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(SHAPES_MODEL, subfolder="unet").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(SHAPES_MODEL, subfolder="scheduler")
    a = scheduler.alphas_cumprod[999]
    context = torch.zeros((1, 77, unet.config.cross_attention_dim))

    def eps(x, t):
        return unet(x, t, encoder_hidden_states=context).sample

    def v(x, t):
        e = eps(x, t)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a.sqrt() * e - (1 - a).sqrt() * x0

    kind, distance = single_file.probe_prediction_type(eps)
    assert kind == "epsilon" and distance < 0.25, distance
    kind, distance = single_file.probe_prediction_type(v)
    assert kind == "v_prediction" and distance > 0.75, distance


class _RunsCode:
    """Unpickling this runs `touch MARKER`: what a malicious .ckpt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoint_files_get_one_line_and_no_engine_folder(tiny_models, tmp_path, capsys):
    from safetensors.torch import save_file

    good = write_checkpoint(tiny_models["sd1"], tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _RunsCode(marker)}}, f)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(tmp_path / "style.safetensors"))
    save_file({"weights": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (truncated, (), "not a readable safetensors file"),
        (evil, (), "needs code that torch's safe loader (weights_only) refuses to run"),
        (tmp_path / "style.safetensors", (), "this is a LoRA, not a model: pass it to `sdrt build MODEL --lora style.safetensors`"),
        (tmp_path / "other.safetensors", (), "no Stable Diffusion U-Net in it"),
        (tmp_path / "notes.txt", (), "not a checkpoint file"),
        (good, (), "read as sd1 (stable-diffusion-v1-5/stable-diffusion-v1-5), but"),  # a tiny model's shapes are no published architecture
        (good, ("--config", tmp_path), "neither a diffusers config folder"),
        (tiny_models["sd1"], ("--prediction-type", "epsilon"), "apply to single-file checkpoints"),
        (good, ("--config", tiny_models["sd1"], "--ema"), "holds no separate EMA weights"),
    ]
    for path, extra, fragment in cases:
        result = in_process(capsys, "build", path, *extra, "--out", tmp_path / "E", "--quiet")
        assert_clean_error(result, fragment)
        assert not (tmp_path / "E").exists() and not list(tmp_path.glob(".E.*"))
    assert not marker.exists()


# the Stability / CompVis inference configs (v1-inference.yaml, v2-inference-v.yaml), as far as sdrt reads them
V1_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
V2_V_YAML = (V1_YAML.replace("    linear_start", "    parameterization: \"v\"\n    linear_start")
             .replace("num_heads: 8", "num_head_channels: 64\n        use_linear_in_transformer: True")
             .replace("context_dim: 768", "context_dim: 1024")
             .replace("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder\n      params:\n        freeze: True\n        layer: \"penultimate\""))


@pytest.mark.parametrize("text,carried,prediction", [(V1_YAML, "sd1", "epsilon"), (V2_V_YAML, "sd2-v", "v_prediction")])
def test_an_original_yaml_config_gives_the_published_architecture(text, carried, prediction, tmp_path):
    from diffusers import UNet2DConditionModel

    path = tmp_path / "inference.yaml"
    path.write_text(text)
    ckpt = _meta_checkpoint(single_file.ARCHITECTURES[carried])
    arch = single_file.architecture_from_yaml(path, ckpt)
    single_file.check_tensors(ckpt, arch)
    assert arch.scheduler["prediction_type"] == prediction and arch.text_encoder == single_file.ARCHITECTURES[carried].text_encoder
    with torch.device("meta"):
        ours, published = (UNet2DConditionModel.from_config(c) for c in (arch.unet, single_file.ARCHITECTURES[carried].unet))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in published.parameters())
    (tmp_path / "bad.yaml").write_text("model: {params: {}}")
    with pytest.raises(single_file.SdrtError, match="not a Stable Diffusion inference config"):
        single_file.architecture_from_yaml(tmp_path / "bad.yaml", ckpt)


@pytest.mark.parametrize("name", list(single_file.ARCHITECTURES))
def test_detected_checkpoints_get_a_config_folder_that_sdrt_and_diffusers_read(name, tmp_path):
    """What a detected full-size checkpoint is built from, short of loading its weights: the carried configs as
    a folder that diffusers' loader and sdrt's model reader both accept, with the prediction type decided."""
    from sdrt.exporters.model_source import SourceOptions, plan_checkpoint
    from sdrt.model_info import read_model_info

    arch = single_file.ARCHITECTURES[name]
    ckpt = _meta_checkpoint(arch)
    if name == "sd2-v":
        ckpt.tensors["v_pred"] = torch.empty((), device="meta")  # the marker some v-prediction files carry
    plan = plan_checkpoint(ckpt, tmp_path, SourceOptions())
    assert plan.arch.name == name and plan.how == "detected" and plan.weights == "the file's only"
    assert plan.prediction == ("v_prediction" if name == "sd2-v" else None)  # sd2 without a marker: the probe decides later
    info = read_model_info(plan.config)
    assert info.prediction_type == arch.scheduler.get("prediction_type", "epsilon")
    assert info.latent_channels == arch.unet["in_channels"] and info.cross_attention_dim == arch.unet["cross_attention_dim"]
    pipeline = "StableDiffusionPipeline" if name == "sd2-depth" else arch.pipeline  # diffusers loads depth files as text-to-image
    assert getattr(diffusers, pipeline).load_config(str(plan.config))["_class_name"] == pipeline
    forced = plan_checkpoint(_meta_checkpoint(single_file.ARCHITECTURES["sd2"]), tmp_path / "forced", SourceOptions(prediction_type="v_prediction"))
    assert forced.arch.name == "sd2-v" and forced.decided == "--prediction-type"
