"""Single-file checkpoints (`.safetensors`, `.ckpt`) in the original CompVis / Stability layout.

Reading: safetensors, or torch's safe unpickler (`weights_only=True`): a pickle that needs any other
code is refused, never run. Detection: diffusers' own (`infer_diffusers_model_type`), refined by the
U-Net's input channels (diffusers calls depth models "v2") and, for SD 2.x text-to-image models, by
the prediction type (below). Every tensor the detected architecture needs is checked for presence
and shape before anything is converted. Conversion: diffusers' single-file loader, offline, given a
folder of the architecture's configs that sdrt carries (`ARCHITECTURES`, the published diffusers
configs) or the user's `--config` folder.

Prediction type of an SD 2.x text-to-image checkpoint (the 512 base models predict noise, the 768 ones
v): --prediction-type, else a `v_pred` marker tensor or ModelSpec metadata, else a probe: at the last
training timestep a noised latent is almost pure noise, so a noise-predicting U-Net returns about its
input, while a v-predicting one returns about sqrt(alpha_bar) times it (v = sqrt(a) eps - sqrt(1-a) x0).
"""

from __future__ import annotations

import copy
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import SdrtError, first_line

from .clip_vocab import write_clip_tokenizer

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PROBE_THRESHOLD = 0.5  # relative distance of the U-Net's output from its input at t=999: below, epsilon; above, v

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "trained_betas": None}
PNDM = {"_class_name": "PNDMScheduler", **SD_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
DDIM = {"_class_name": "DDIMScheduler", **SD_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
          "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
OPEN_CLIP_H = {**CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
               "hidden_act": "gelu", "projection_dim": 512}
SD_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
           "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
           "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD2_UNET = {**SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
SD_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215}


@dataclass(frozen=True)
class Architecture:
    """What sdrt builds a detected checkpoint as: diffusers' configs of the published model."""

    name: str
    published: str  # the diffusers model it matches
    pipeline: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    pad_token: str
    extra: dict | None = None  # further model_index entries / component configs


ARCHITECTURES = {a.name: a for a in (
    Architecture("sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", SD_UNET, SD_VAE, CLIP_L, PNDM,
                 "<|endoftext|>"),
    Architecture("sd1-inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", "StableDiffusionInpaintPipeline",
                 {**SD_UNET, "in_channels": 9}, SD_VAE, CLIP_L, PNDM, "<|endoftext|>"),
    Architecture("sd2", "stabilityai/stable-diffusion-2-1-base", "StableDiffusionPipeline", SD2_UNET, SD_VAE, OPEN_CLIP_H,
                 {**DDIM, "prediction_type": "epsilon"}, "!"),
    Architecture("sd2-v", "stabilityai/stable-diffusion-2-1", "StableDiffusionPipeline", {**SD2_UNET, "sample_size": 96, "upcast_attention": True},
                 {**SD_VAE, "sample_size": 768}, OPEN_CLIP_H, {**DDIM, "prediction_type": "v_prediction"}, "!"),
    Architecture("sd2-inpaint", "stabilityai/stable-diffusion-2-inpainting", "StableDiffusionInpaintPipeline", {**SD2_UNET, "in_channels": 9},
                 SD_VAE, OPEN_CLIP_H, {**DDIM, "prediction_type": "epsilon"}, "!"),
    Architecture("sd2-depth", "stabilityai/stable-diffusion-2-depth", "StableDiffusionDepth2ImgPipeline", {**SD2_UNET, "in_channels": 5},
                 SD_VAE, OPEN_CLIP_H, {**DDIM, "prediction_type": "epsilon"}, "!"),
    Architecture("sd-x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler", "StableDiffusionUpscalePipeline",
                 {**SD2_UNET, "sample_size": 128, "in_channels": 7, "num_class_embeds": 1000, "block_out_channels": [256, 512, 512, 1024],
                  "attention_head_dim": 8, "only_cross_attention": [True, True, True, False],
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
                 {**SD_VAE, "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
                  "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 256, "scaling_factor": 0.08333},
                 OPEN_CLIP_H, {**DDIM, "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"}, "!",
                 extra={"max_noise_level": 350, "low_res_scheduler": {"_class_name": "DDPMScheduler", **SD_BETAS, "beta_start": 0.0001,
                                                                      "beta_end": 0.02}}),
)}
# diffusers' model types -> sdrt's architectures (by U-Net input channels where diffusers does not tell)
DIFFUSERS_TYPES = {"v1": {4: "sd1"}, "inpainting": {9: "sd1-inpaint"}, "v2": {4: "sd2", 5: "sd2-depth"}, "inpainting_v2": {9: "sd2-inpaint"},
                   "upscale": {7: "sd-x4-upscaler"}}
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict  # name -> torch.Tensor
    metadata: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensors of a .safetensors or .ckpt file, or one clear error. Nothing in the file is executed."""
    import torch

    if not path.is_file():
        raise SdrtError(f"{path}: no such file")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise SdrtError(f"{path}: not a checkpoint file: accepted are a diffusers model folder or a single file ending in "
                        f"{', '.join(CHECKPOINT_SUFFIXES)}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:  # shapes only (meta tensors): detection and checks need no data, diffusers reads it later
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
                return Checkpoint(path, shapes, dict(f.metadata() or {}))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SdrtError(f"{path}: not a readable safetensors file ({first_line(exc)}); a truncated download looks like this") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the old (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SdrtError(f"{path}: this pickle needs code that torch's safe loader (weights_only) refuses to run "
                        f"({first_line(exc).split('. ')[0]}); sdrt never runs code from a model file: convert it to .safetensors "
                        "with a tool you trust") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise SdrtError(f"{path}: not a readable checkpoint ({first_line(exc)}); a truncated download looks like this") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {**{k: v for k, v in state.items() if k != "state_dict"}, **state["state_dict"]}
    if not isinstance(state, dict):
        raise SdrtError(f"{path}: holds a {type(state).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {k: v for k, v in state.items() if isinstance(v, (int, float, str))}
    return Checkpoint(path, tensors, metadata)


def detect(ckpt: Checkpoint) -> Architecture:
    """The architecture of a Stable Diffusion 1.x/2.x checkpoint, or one clear error saying what the file is."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = ckpt.tensors
    if UNET_IN not in keys:
        if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
            raise SdrtError(f"{ckpt.path}: this is a LoRA, not a model: pass it to `sdrt build MODEL --lora {ckpt.path.name}`")
        if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys) and len(keys) < 400:
            raise SdrtError(f"{ckpt.path}: this is a VAE alone, not a model: pass it as `sdrt build MODEL --vae {ckpt.path.name}`")
        raise SdrtError(f"{ckpt.path}: no Stable Diffusion U-Net in it (no {UNET_IN}); accepted are SD 1.x/2.x checkpoints in the "
                        "original layout and diffusers folders")
    kind = infer_diffusers_model_type(keys)
    channels = int(keys[UNET_IN].shape[1])
    name = DIFFUSERS_TYPES.get(kind, {}).get(channels)
    if name is None:
        raise SdrtError(f"{ckpt.path}: diffusers reads this as a {kind!r} model with a {channels}-channel U-Net, which sdrt does not "
                        f"build; accepted are SD 1.x/2.x text-to-image, inpainting, depth and x4-upscaler checkpoints, or pass --config "
                        "with a diffusers config folder for it")
    return ARCHITECTURES[name]


def architecture_from_yaml(path: Path, ckpt: Checkpoint) -> Architecture:
    """--config original.yaml (the Stability / CompVis inference config of the checkpoint): the U-Net and VAE configs
    by diffusers' own readers of that format; the text encoder by the family the yaml names (CLIP ViT-L/14 for SD 1,
    OpenCLIP ViT-H/14 for SD 2), its prediction type from `parameterization`, its betas from linear_start/end."""
    import yaml
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    try:
        original = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = original["model"]["params"]
        unet = {"_class_name": "UNet2DConditionModel", **create_unet_diffusers_config_from_ldm(original, ckpt.tensors)}
        vae = {"_class_name": "AutoencoderKL", **create_vae_diffusers_config_from_ldm(original, ckpt.tensors)}
        encoder = str(params["cond_stage_config"]["target"])
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise SdrtError(f"--config {path}: not a Stable Diffusion inference config (model.params with unet_config, first_stage_config "
                        f"and cond_stage_config): {first_line(exc)}") from None
    open_clip = "OpenCLIP" in encoder
    if not open_clip and "FrozenCLIPEmbedder" not in encoder:
        raise SdrtError(f"--config {path}: text encoder {encoder!r} is not supported: accepted are FrozenCLIPEmbedder (SD 1) and "
                        "FrozenOpenCLIPEmbedder (SD 2)")
    betas = {"beta_start": params.get("linear_start", 0.00085), "beta_end": params.get("linear_end", 0.012)}
    scheduler = {**(DDIM if open_clip else PNDM), **betas,
                 "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon"}
    channels = unet["in_channels"]
    pipeline = {9: "StableDiffusionInpaintPipeline", 5: "StableDiffusionDepth2ImgPipeline"}.get(channels, "StableDiffusionPipeline")
    extra = None
    if unet.get("num_class_embeds"):
        low = params.get("low_scale_config", {}).get("params", {})
        schedule = low.get("noise_schedule_config", {})
        pipeline, extra = "StableDiffusionUpscalePipeline", {
            "max_noise_level": low.get("max_noise_level", 350),
            "low_res_scheduler": {"_class_name": "DDPMScheduler", **SD_BETAS, "beta_start": schedule.get("linear_start", 0.0001),
                                  "beta_end": schedule.get("linear_end", 0.02)}}
    return Architecture(path.name, str(path.resolve()), pipeline, unet, vae, OPEN_CLIP_H if open_clip else CLIP_L, scheduler,
                        "!" if open_clip else "<|endoftext|>", extra)


def prediction_type_marker(ckpt: Checkpoint) -> str | None:
    """What the file says about its prediction type, if anything."""
    if "v_pred" in ckpt.tensors:
        return "v_prediction"
    said = str(ckpt.metadata.get("modelspec.prediction_type", "")).lower()
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(said)


def probe_prediction_type(predict, channels: int = 4, seed: int = 0) -> tuple[str, float]:
    """predict(x (1, C, 16, 16) float32 tensor, t) -> the U-Net's output. -> (prediction type, the distance that decided it)."""
    import torch

    x = torch.randn((1, channels, 16, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = predict(x, 999)
    distance = float(((out - x) ** 2).mean() / (x**2).mean())
    return ("epsilon" if distance < PROBE_THRESHOLD else "v_prediction"), distance


def check_tensors(ckpt: Checkpoint, arch: Architecture) -> None:
    """Every tensor the architecture's U-Net, VAE and text encoder need is in the file with the right shape."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .original_layout import clip_keys, open_clip_keys, unet_keys, vae_keys

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch.unet)
        vae = AutoencoderKL.from_config(arch.vae)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in arch.text_encoder.items() if k not in ("architectures", "model_type")}))
    sd2 = arch.text_encoder["hidden_size"] == OPEN_CLIP_H["hidden_size"]
    text_keys = open_clip_keys(text, extra_layer=False) if sd2 else clip_keys(text)
    text_keys.pop("cond_stage_model.model.text_projection", None)  # dropped by diffusers: need not be there
    for part, expected in (("U-Net", unet_keys(unet)), ("VAE", vae_keys(vae)), ("text encoder", text_keys)):
        missing = [k for k in expected if k not in ckpt.tensors]
        if missing:
            raise SdrtError(f"{ckpt.path}: read as {arch.name} ({arch.published}), but {len(missing)} of the {part}'s {len(expected)} tensors "
                            f"are missing, e.g. {missing[0]}; pass --config with the folder of its diffusers configs if it is another architecture")
        for k, value in expected.items():
            if tuple(ckpt.tensors[k].shape) != tuple(value.shape):
                raise SdrtError(f"{ckpt.path}: read as {arch.name} ({arch.published}), but {k} has shape {tuple(ckpt.tensors[k].shape)} "
                                f"where that architecture has {tuple(value.shape)}; pass --config with the folder of its diffusers configs")


def write_config_folder(arch: Architecture, folder: Path, prediction_type: str) -> Path:
    """A diffusers model folder without weights: model_index.json, each component's config, the CLIP tokenizer."""
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", arch.scheduler["_class_name"]]}
    extra = copy.deepcopy(arch.extra or {})
    low_res = extra.pop("low_res_scheduler", None)
    if low_res:
        components["low_res_scheduler"] = ["diffusers", low_res["_class_name"]]
    # diffusers' depth pipeline has no single-file loader: its components load as text-to-image ones
    pipeline = "StableDiffusionPipeline" if arch.pipeline == "StableDiffusionDepth2ImgPipeline" else arch.pipeline
    index = {"_class_name": pipeline, **components, **extra}
    if pipeline == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    configs = {"unet/config.json": arch.unet, "vae/config.json": arch.vae, "text_encoder/config.json": arch.text_encoder,
               "scheduler/scheduler_config.json": {**arch.scheduler, "prediction_type": prediction_type}}
    if low_res:
        configs["low_res_scheduler/scheduler_config.json"] = low_res
    for name, config in {"model_index.json": index, **configs}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config, indent=2))
    write_clip_tokenizer(folder / "tokenizer", pad_token=arch.pad_token)
    return folder
