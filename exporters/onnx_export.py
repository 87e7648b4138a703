"""torch -> ONNX for each Stable Diffusion component, with a parity check in ONNX Runtime.

Graphs take the names, dtypes and dynamic dims of `sdrt.components`. The U-Net is traced at a
latent size that is not a multiple of its up-sampling factor, so that the traced graph forwards
explicit up-sampling sizes and serves every latent size, as diffusers' U-Net does.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from sdrt.components import ComponentSpec
from sdrt.model_info import ModelInfo

from .model_source import TINY_DECODER_FOLDER

log = logging.getLogger(__name__)

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1


class TextEncoder(torch.nn.Module):
    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids):  # (B, S) int64 -> (B, S, D)
        return self.model(input_ids, return_dict=False)[0]


class UNet(torch.nn.Module):
    def __init__(self, model: UNet2DConditionModel):
        super().__init__()
        self.model = model
        cfg = model.config  # the optional inputs it has, in the order of its ComponentSpec
        self.extras = [name for name, has in (("class_labels", cfg.class_embed_type or cfg.num_class_embeds),
                                              ("timestep_cond", cfg.time_cond_proj_dim)) if has]

    def forward(self, sample, timestep, encoder_hidden_states, *extras):
        # (B, C, h, w), (B,), (B, S, D)[, class_labels (B,) or (B, E)][, timestep_cond (B, G)] -> (B, C', h, w)
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                          **dict(zip(self.extras, extras)))[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def forward(self, latent_sample):  # (B, C, h, w), already divided by scaling_factor -> (B, 3, H, W) in [-1, 1]
        return self.model.decode(latent_sample, return_dict=False)[0]


class TinyVaeDecoder(torch.nn.Module):
    """An AutoencoderTiny (TAESD) decoding in place of the VAE: it takes latents as the U-Net makes them, so the
    pipeline's division by the VAE's scaling_factor is undone here (diffusers divides by the tiny VAE's own 1.0)."""

    def __init__(self, model, scaling_factor: float):
        super().__init__()
        self.model, self.scaling_factor = model, scaling_factor

    def forward(self, latent_sample):  # (B, C, h, w), divided by the VAE's scaling_factor -> (B, 3, H, W) in [-1, 1]
        return self.model.decode(latent_sample * self.scaling_factor, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def forward(self, sample):  # (B, 3, H, W) in [-1, 1] -> (B, 2C, h, w): mean and log-variance
        return self.model.encode(sample, return_dict=False)[0].parameters


class DepthEstimator(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):  # (B, 3, h, w) as the DPT image processor makes them -> (B, h', w') relative depth
        return self.model(pixel_values, return_dict=False)[0]


class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):  # (B, 3, h, w) as the CLIP image processor makes them -> (B, D) projected embeddings
        return self.model(pixel_values).image_embeds


def load_modules(model_dir: Path, names: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")) -> dict[str, torch.nn.Module]:
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    modules = {
        "text_encoder": TextEncoder(text_encoder),
        "unet": UNet(unet),
        "vae_decoder": VaeDecoder(vae),
        "vae_encoder": VaeEncoder(vae),
    }
    if (model_dir / TINY_DECODER_FOLDER / "config.json").is_file():  # --vae-decoder: a tiny decoder
        from diffusers import AutoencoderTiny

        tiny = AutoencoderTiny.from_pretrained(model_dir / TINY_DECODER_FOLDER, torch_dtype=torch.float32)
        modules["vae_decoder"] = TinyVaeDecoder(tiny, vae.config.scaling_factor)
    if "image_encoder" in names:
        from transformers import CLIPVisionModelWithProjection

        modules["image_encoder"] = ImageEncoder(CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder", torch_dtype=torch.float32))
    if "depth_estimator" in names:
        from transformers import DPTForDepthEstimation

        modules["depth_estimator"] = DepthEstimator(DPTForDepthEstimation.from_pretrained(model_dir / "depth_estimator", torch_dtype=torch.float32))
    return {name: modules[name].eval() for name in names}


def trace_sizes(info: ModelInfo) -> dict[str, int]:
    """Dynamic dim sizes to trace at: latents that are not a multiple of the U-Net's up factor."""
    up = info.unet_up_factor
    return {"batch": 2, "sequence": info.text_max_length, "latent_height": up + 1, "latent_width": up + 3,
            "height": 2 * info.vae_scale_factor, "width": 3 * info.vae_scale_factor, "vocab": info.text_vocab_size}


def check_sizes(info: ModelInfo) -> dict[str, int]:
    """Other sizes than the trace, to check that the dynamic dims really are dynamic."""
    up = info.unet_up_factor
    return {"batch": 1, "sequence": info.text_max_length, "latent_height": 2 * up, "latent_width": 3 * up,
            "height": 2 * up * info.vae_scale_factor, "width": up * info.vae_scale_factor, "vocab": info.text_vocab_size}


def export_component(module: torch.nn.Module, spec: ComponentSpec, sizes: dict[str, int], out_dir: Path) -> Path:
    """Export to `out_dir/model.onnx` (+ `model.onnx.data` above protobuf's 2 GB limit)."""
    feeds = spec.sample_inputs(sizes, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    dynamic_axes = {
        t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)} for t in (*spec.inputs, *spec.outputs)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes,
            )
        model = onnx.load(str(raw), load_external_data=True)
        target = out_dir / "model.onnx"
        large = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT - 2**26
        onnx.save_model(model, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    return target


def check_export(onnx_path: Path, module: torch.nn.Module, spec: ComponentSpec, sizes: dict[str, int]) -> float:
    """Max abs difference between ONNX Runtime and the torch module on fresh random inputs."""
    feeds = spec.sample_inputs(sizes, np.random.default_rng(1))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ours = session.run(None, feeds)[0]
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
    if ours.shape != ref.shape:
        raise RuntimeError(f"{spec.name}: ONNX output shape {ours.shape} differs from torch {ref.shape}")
    return float(np.abs(ours - ref).max())
