"""The shape-relevant facts of a Stable Diffusion model, read from a diffusers folder's configs.

Nothing is assumed from SD 1.5: every value comes from `unet/config.json`, `vae/config.json`,
`text_encoder/config.json`, `tokenizer/` and `scheduler/scheduler_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import SdrtError
from .schedulers.config import CommonConfig

COMPONENT_FOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       "StableDiffusionDepth2ImgPipeline", "StableDiffusionUpscalePipeline", "StableUnCLIPImg2ImgPipeline",
                       "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
UPSCALER_SCALING_FACTOR = 0.08333  # diffusers' StableDiffusionUpscalePipeline sets it whatever the VAE config says


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    pipeline: str  # model_index.json's _class_name
    latent_channels: int  # U-Net input channels
    unet_out_channels: int
    unet_up_factor: int  # 2 ** (number of U-Net down blocks - 1)
    vae_scale_factor: int  # 2 ** (len(vae.block_out_channels) - 1)
    vae_latent_channels: int
    scaling_factor: float  # latents are divided by this before the VAE decoder
    cross_attention_dim: int
    text_hidden_size: int
    text_vocab_size: int
    text_max_length: int  # tokens per prompt, including start and end
    prediction_type: str
    default_height: int  # unet.sample_size * vae_scale_factor
    default_width: int
    depth_processor: dict | None = None  # depth-to-image with a depth estimator: its image processor (sdrt.depth)
    class_labels: str | None = None  # what the U-Net's class_labels input holds: "noise_level" (x4 upscaler), "image_embeds" (unCLIP)
    max_noise_level: int | None = None  # x4 upscaler: the largest noise level its U-Net takes
    low_res_scheduler: dict | None = None  # x4 upscaler: the config of the scheduler that noises the low-resolution image
    clip_processor: dict | None = None  # unCLIP: the image encoder's image processor (sdrt.clip_image)
    image_noising_scheduler: dict | None = None  # unCLIP: the config of the scheduler that noises the image embedding
    image_embed_dim: int | None = None  # unCLIP: the image encoder's projection size (the class labels take twice that)
    image_normalizer: dict | None = None  # unCLIP: {"mean": [...], "std": [...]} of the image embeddings (filled in by the build)
    guidance_embed_dim: int | None = None  # LCM-distilled U-Nets: the guidance scale enters as an embedding of this size (timestep_cond)
    vae_sample_size: int | None = None  # the VAE config's sample_size (pixels): the tile side of diffusers' tiled decoding; None: 512
    unet_up_layers: int | None = None  # layers of the U-Net's last up block (its first layers_per_block + 1): step caching's branches
    unet_base_channels: int | None = None  # the U-Net's first block_out_channels: channels of the feature step caching keeps

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(**data)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SdrtError(f"{path} is missing: a diffusers model folder needs {', '.join(COMPONENT_FOLDERS)} with their configs")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SdrtError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


_REQUIRED = object()


def _int(config: dict, path: Path, key: str, low: int, high: int, default: Any = _REQUIRED) -> int:
    """config[key] as an int in [low, high]; an error naming the file, key and accepted range otherwise."""
    if key not in config and default is not _REQUIRED:
        return default
    value = config.get(key)
    if key not in config:
        raise SdrtError(f"{path}: {key!r} is missing (an integer {low} .. {high})")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SdrtError(f"{path}: {key} {value!r} is not accepted: an integer {low} .. {high}")
    return value


def _ints(config: dict, path: Path, key: str, low: int, high: int, max_len: int) -> list[int]:
    """config[key] as a non-empty list of ints in [low, high]."""
    value = config.get(key)
    if key not in config:
        raise SdrtError(f"{path}: {key!r} is missing (a list of 1 .. {max_len} integers)")
    if not isinstance(value, list) or not 1 <= len(value) <= max_len:
        raise SdrtError(f"{path}: {key} {value!r} is not accepted: a list of 1 .. {max_len} integers")
    return [_int({key: v}, path, key, low, high) for v in value]


def scheduler_config_path(model_dir: Path) -> Path:
    return model_dir / "scheduler" / "scheduler_config.json"


MAX_SIZE = 16384  # pixels per side: far beyond any SD model, small enough to refuse nonsense before allocating
MAX_CHANNELS = 8192


def read_model_info(model_dir: Path) -> ModelInfo:
    """Every value checked for type and range, so that a broken config is one clear error, before any work."""
    if not model_dir.is_dir():
        raise SdrtError(f"model folder {model_dir} does not exist")
    index = read_json(model_dir / "model_index.json")
    pipeline = index.get("_class_name", "")
    if pipeline not in SUPPORTED_PIPELINES:
        raise SdrtError(f"model_index.json _class_name {pipeline!r} is not supported: accepted values are {', '.join(SUPPORTED_PIPELINES)}")
    paths = {name: model_dir / name / "config.json" for name in ("unet", "vae", "text_encoder")}
    unet, vae, text = (read_json(paths[name]) for name in ("unet", "vae", "text_encoder"))
    sched_path = scheduler_config_path(model_dir)
    sched = read_json(sched_path)
    tok_cfg_path = model_dir / "tokenizer" / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    for name in ("vocab.json", "merges.txt"):
        if not (model_dir / "tokenizer" / name).is_file():
            raise SdrtError(f"{model_dir / 'tokenizer' / name} is missing: the CLIP tokenizer needs vocab.json and merges.txt")
    max_len = _int(tok_cfg, tok_cfg_path, "model_max_length", 1, 10**30, default=77)
    max_len = min(max_len, _int(text, paths["text_encoder"], "max_position_embeddings", 3, 4096, default=77))
    vae_scale = 2 ** (len(_ints(vae, paths["vae"], "block_out_channels", 1, MAX_CHANNELS, 6)) - 1)
    vae_sample = vae.get("sample_size", 32)  # diffusers' default; a [height, width] list tiles by its first value, as diffusers does
    vae_sample = _int({"sample_size": vae_sample[0] if isinstance(vae_sample, list) and vae_sample else vae_sample}, paths["vae"],
                      "sample_size", vae_scale, MAX_SIZE)
    unet_blocks = _ints(unet, paths["unet"], "block_out_channels", 1, MAX_CHANNELS, 8)
    unet_layers = unet.get("layers_per_block", 2)  # an int, or one per down block (the last up block mirrors the first)
    unet_layers = _int({"layers_per_block": unet_layers[0] if isinstance(unet_layers, list) and unet_layers else unet_layers},
                       paths["unet"], "layers_per_block", 1, 16)
    sample_size = unet.get("sample_size", 64)
    sizes = sample_size if isinstance(sample_size, list) and len(sample_size) == 2 else [sample_size]
    height, width = (_int({"sample_size": v}, paths["unet"], "sample_size", 1, MAX_SIZE // vae_scale) * vae_scale for v in sizes * (3 - len(sizes)))
    scaling_factor = vae.get("scaling_factor", 0.18215)
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or not 0 < scaling_factor < 1e6:
        raise SdrtError(f"{paths['vae']}: scaling_factor {scaling_factor!r} is not accepted: a positive number")
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in CommonConfig.PREDICTION_TYPES:
        raise SdrtError(f"{sched_path}: prediction_type {prediction_type!r} is not accepted: accepted values are {', '.join(CommonConfig.PREDICTION_TYPES)}")
    cross_attention_dim = unet.get("cross_attention_dim")
    depth_processor = None
    if pipeline == "StableDiffusionDepth2ImgPipeline" and (index.get("depth_estimator") or [None])[0] is not None:
        from .depth import read_dpt_processor

        depth_processor = read_dpt_processor(model_dir / "feature_extractor" / "preprocessor_config.json")
    upscaler, unclip = pipeline == "StableDiffusionUpscalePipeline", pipeline == "StableUnCLIPImg2ImgPipeline"
    unclip_info = {}
    if unclip:
        from .clip_image import read_clip_processor

        encoder_path = model_dir / "image_encoder" / "config.json"
        projection = _int(read_json(encoder_path), encoder_path, "projection_dim", 1, MAX_CHANNELS)
        if unet.get("class_embed_type") != "projection" or unet.get("projection_class_embeddings_input_dim") != 2 * projection:
            raise SdrtError(f"{paths['unet']}: an unCLIP U-Net needs class_embed_type 'projection' with projection_class_embeddings_input_dim "
                            f"{2 * projection} (twice the image encoder's projection_dim)")
        unclip_info = {"image_embed_dim": projection,
                       "clip_processor": read_clip_processor(model_dir / "feature_extractor" / "preprocessor_config.json"),
                       "image_noising_scheduler": read_json(model_dir / "image_noising_scheduler" / "scheduler_config.json")}
    if upscaler:
        scaling_factor = UPSCALER_SCALING_FACTOR
        if unet.get("num_class_embeds") is None:
            raise SdrtError(f"{paths['unet']}: an upscaler U-Net needs num_class_embeds (its noise-level labels)")
    return ModelInfo(
        pipeline=pipeline,
        latent_channels=_int(unet, paths["unet"], "in_channels", 1, 64, default=4),
        unet_out_channels=_int(unet, paths["unet"], "out_channels", 1, 64, default=4),
        unet_up_factor=2 ** (len(unet_blocks) - 1),
        vae_scale_factor=vae_scale,
        vae_latent_channels=_int(vae, paths["vae"], "latent_channels", 1, 64, default=4),
        scaling_factor=float(scaling_factor),
        cross_attention_dim=_int({"cross_attention_dim": cross_attention_dim}, paths["unet"], "cross_attention_dim", 1, MAX_CHANNELS),
        text_hidden_size=_int(text, paths["text_encoder"], "hidden_size", 1, MAX_CHANNELS),
        text_vocab_size=_int(text, paths["text_encoder"], "vocab_size", 1, 10**7),
        text_max_length=max_len,
        prediction_type=prediction_type,
        default_height=height,
        default_width=width,
        depth_processor=depth_processor,
        class_labels="noise_level" if upscaler else "image_embeds" if unclip else None,
        max_noise_level=_int(index, model_dir / "model_index.json", "max_noise_level", 0, 10**4, default=350) if upscaler else None,
        low_res_scheduler=read_json(model_dir / "low_res_scheduler" / "scheduler_config.json") if upscaler else None,
        guidance_embed_dim=_int(unet, paths["unet"], "time_cond_proj_dim", 1, MAX_CHANNELS) if unet.get("time_cond_proj_dim") else None,
        vae_sample_size=vae_sample,
        unet_up_layers=unet_layers + 1,
        unet_base_channels=unet_blocks[0],
        **unclip_info,
    )
