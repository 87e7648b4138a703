"""Each exported component described once: tensor names, dtypes and dims (symbolic where dynamic).

Exporters, every engine and the pipeline read these descriptions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .model_info import ModelInfo

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[Dim, ...]


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ComponentSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in items)

        return cls(data["name"], tensors(data["inputs"]), tensors(data["outputs"]))

    def sample_inputs(self, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random inputs with dynamic dims taken from `sizes` (export checks, warm-up)."""
        feeds = {}
        for t in self.inputs:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.dims)
            if t.name == "class_labels" and t.dtype == "int64":
                feeds[t.name] = rng.integers(0, sizes.get("classes", 350), size=shape).astype(t.dtype)
            elif np.issubdtype(np.dtype(t.dtype), np.integer):
                feeds[t.name] = rng.integers(0, sizes.get("vocab", 1000), size=shape).astype(t.dtype)
            elif t.name == "timestep":
                feeds[t.name] = rng.uniform(0, 999, size=shape).astype(t.dtype)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return feeds


UNET_PASSES = ("unet", "unet_shallow")  # what runs every denoising step: the U-Net and its step-caching shallow pass


def cache_branches(info: ModelInfo) -> int:
    """How many step-caching branches the U-Net has: the last up block's layers but its first (DeepCache's branch b
    keeps the output of that block's layer L-2-b and recomputes the layers after it)."""
    return max(0, (info.unet_up_layers or 0) - 1)


def component_specs(info: ModelInfo, cache_branch: int | None = None) -> dict[str, ComponentSpec]:
    """cache_branch (step caching, DeepCache): the U-Net also returns the feature its shallow pass, `unet_shallow`,
    starts from."""
    c, c_out, c_vae = info.latent_channels, info.unet_out_channels, info.vae_latent_channels
    class_labels = {"noise_level": (TensorSpec("class_labels", "int64", ("batch",)),),
                    "image_embeds": (TensorSpec("class_labels", "float32", ("batch", 2 * (info.image_embed_dim or 0))),)}.get(info.class_labels, ())
    specs = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", ("batch", info.text_max_length)),),
            (TensorSpec("last_hidden_state", "float32", ("batch", info.text_max_length, info.text_hidden_size)),),
        ),
        "unet": ComponentSpec(
            "unet",
            (
                TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", info.cross_attention_dim)),
                *class_labels,  # the x4 upscaler's noise level, unCLIP's noised image embedding
                *((TensorSpec("timestep_cond", "float32", ("batch", info.guidance_embed_dim)),) if info.guidance_embed_dim else ()),
            ),
            (TensorSpec("out_sample", "float32", ("batch", c_out, "latent_height", "latent_width")),),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent_sample", "float32", ("batch", c_vae, "latent_height", "latent_width")),),
            (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
            (TensorSpec("latent_parameters", "float32", ("batch", 2 * c_vae, "latent_height", "latent_width")),),
        ),
    }
    if cache_branch is not None:
        feature = TensorSpec("deep_feature", "float32", ("batch", info.unet_base_channels, "latent_height", "latent_width"))
        unet = specs["unet"]
        specs["unet"] = dataclasses.replace(unet, outputs=(*unet.outputs, feature))
        specs["unet_shallow"] = ComponentSpec("unet_shallow", (*unet.inputs, feature), unet.outputs)
    if info.clip_processor:  # unCLIP's CLIP vision encoder at its processor's crop size
        crop = (info.clip_processor["crop_height"], info.clip_processor["crop_width"])
        specs["image_encoder"] = ComponentSpec(
            "image_encoder",
            (TensorSpec("pixel_values", "float32", ("batch", 3, *crop)),),
            (TensorSpec("image_embeds", "float32", ("batch", info.image_embed_dim)),),
        )
    if info.depth_processor:  # DPT at its processor's fixed input size; its output size is the model's own
        size = (info.depth_processor["height"], info.depth_processor["width"])
        specs["depth_estimator"] = ComponentSpec(
            "depth_estimator",
            (TensorSpec("pixel_values", "float32", ("batch", 3, *size)),),
            (TensorSpec("predicted_depth", "float32", ("batch", "depth_height", "depth_width")),),
        )
    return specs
