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

COMPONENT_FOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(**data)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SdrtError(f"{path} is missing: a diffusers model folder needs {', '.join(COMPONENT_FOLDERS)} with their configs")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} is not valid JSON: {exc}") from None


def scheduler_config_path(model_dir: Path) -> Path:
    return model_dir / "scheduler" / "scheduler_config.json"


def read_model_info(model_dir: Path) -> ModelInfo:
    if not model_dir.is_dir():
        raise SdrtError(f"model folder {model_dir} does not exist")
    index = read_json(model_dir / "model_index.json")
    pipeline = index.get("_class_name", "")
    if pipeline not in SUPPORTED_PIPELINES:
        raise SdrtError(f"model_index.json _class_name {pipeline!r} is not supported: accepted values are {', '.join(SUPPORTED_PIPELINES)}")
    unet = read_json(model_dir / "unet" / "config.json")
    vae = read_json(model_dir / "vae" / "config.json")
    text = read_json(model_dir / "text_encoder" / "config.json")
    sched = read_json(scheduler_config_path(model_dir))
    tok_cfg_path = model_dir / "tokenizer" / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    for name in ("vocab.json", "merges.txt"):
        if not (model_dir / "tokenizer" / name).is_file():
            raise SdrtError(f"{model_dir / 'tokenizer' / name} is missing: the CLIP tokenizer needs vocab.json and merges.txt")
    max_len = int(tok_cfg.get("model_max_length", 77))
    max_len = min(max_len, int(text.get("max_position_embeddings", 77)))
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        height, width = (int(s) * vae_scale for s in sample_size)
    else:
        height = width = int(sample_size) * vae_scale
    return ModelInfo(
        pipeline=pipeline,
        latent_channels=int(unet.get("in_channels", 4)),
        unet_out_channels=int(unet.get("out_channels", 4)),
        unet_up_factor=2 ** (len(unet["block_out_channels"]) - 1),
        vae_scale_factor=vae_scale,
        vae_latent_channels=int(vae.get("latent_channels", 4)),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        cross_attention_dim=int(unet["cross_attention_dim"]),
        text_hidden_size=int(text["hidden_size"]),
        text_vocab_size=int(text["vocab_size"]),
        text_max_length=max_len,
        prediction_type=sched.get("prediction_type", "epsilon"),
        default_height=height,
        default_width=width,
    )
