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


def _extra_inputs(model: UNet2DConditionModel) -> list[str]:
    """The optional U-Net inputs the model has, in the order of its ComponentSpec."""
    cfg = model.config
    return [name for name, has in (("class_labels", cfg.class_embed_type or cfg.num_class_embeds),
                                   ("timestep_cond", cfg.time_cond_proj_dim)) if has]


class UNet(torch.nn.Module):
    def __init__(self, model: UNet2DConditionModel):
        super().__init__()
        self.model = model
        self.extras = _extra_inputs(model)

    def forward(self, sample, timestep, encoder_hidden_states, *extras):
        # (B, C, h, w), (B,), (B, S, D)[, class_labels (B,) or (B, E)][, timestep_cond (B, G)] -> (B, C', h, w)
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                          **dict(zip(self.extras, extras)))[0]


def _layer(block, j: int):
    """Layer j of a U-Net block: its attention where it has them (which follows the resnet), else its resnet."""
    return block.attentions[j] if getattr(block, "attentions", None) else block.resnets[j]


def _run_layer(block, j: int, hidden, emb, context):
    hidden = block.resnets[j](hidden, emb)
    if getattr(block, "attentions", None):
        hidden = block.attentions[j](hidden, encoder_hidden_states=context, return_dict=False)[0]
    return hidden


class UNetWithFeature(UNet):
    """The whole U-Net, also returning what step caching keeps (DeepCache, Ma et al. 2023): for branch b, the output
    of the last up block's layer L-2-b, L its layer count (branch 0: the one before the last)."""

    def __init__(self, model: UNet2DConditionModel, branch: int):
        super().__init__(model)
        self.kept = _layer(model.up_blocks[-1], len(model.up_blocks[-1].resnets) - 2 - branch)

    def forward(self, sample, timestep, encoder_hidden_states, *extras):
        # -> out_sample (B, C', h, w), deep_feature (B, block_out_channels[0], h, w)
        kept = []
        hook = self.kept.register_forward_hook(lambda module, args, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            out = super().forward(sample, timestep, encoder_hidden_states, *extras)
        finally:
            hook.remove()
        return out, kept[0]


class UNetShallow(torch.nn.Module):
    """Step caching's shallow pass for branch b: the time embedding, conv_in and the first b layers of the first down
    block (the skips the recomputed layers take), then the last b + 1 layers of the last up block from the kept
    feature, and the output convolution. With a fresh feature it gives the whole U-Net's output; DeepCache's
    DeepCacheSDHelper skips the same modules."""

    def __init__(self, model: UNet2DConditionModel, branch: int):
        super().__init__()
        self.model, self.branch = model, branch
        self.extras = _extra_inputs(model)

    def forward(self, sample, timestep, encoder_hidden_states, *extras_and_feature):
        # (B, C, h, w), (B,), (B, S, D)[, class_labels][, timestep_cond], deep_feature (B, F, h, w) -> (B, C', h, w)
        m, extras, feature = self.model, dict(zip(self.extras, extras_and_feature[:-1])), extras_and_feature[-1]
        emb = m.time_embedding(m.get_time_embed(sample=sample, timestep=timestep), extras.get("timestep_cond"))
        class_emb = m.get_class_embed(sample=sample, class_labels=extras.get("class_labels"))
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if m.config.class_embeddings_concat else emb + class_emb
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        skips = [m.conv_in(sample)]
        for j in range(self.branch):
            skips.append(_run_layer(m.down_blocks[0], j, skips[-1], emb, encoder_hidden_states))
        up = m.up_blocks[-1]
        hidden = feature
        for j in range(len(up.resnets) - 1 - self.branch, len(up.resnets)):
            hidden = _run_layer(up, j, torch.cat([hidden, skips.pop()], dim=1), emb, encoder_hidden_states)
        if m.conv_norm_out is not None:
            hidden = m.conv_act(m.conv_norm_out(hidden))
        return m.conv_out(hidden)


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


def load_modules(model_dir: Path, names: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
                 cache_branch: int | None = None) -> dict[str, torch.nn.Module]:
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    modules = {
        "text_encoder": TextEncoder(text_encoder),
        "unet": UNet(unet) if cache_branch is None else UNetWithFeature(unet, cache_branch),
        "unet_shallow": UNetShallow(unet, cache_branch or 0),
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
    outputs = session.run(None, feeds)
    with torch.no_grad():
        refs = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    error = 0.0
    for ours, ref in zip(outputs, refs if isinstance(refs, tuple) else (refs,)):
        if ours.shape != tuple(ref.shape):
            raise RuntimeError(f"{spec.name}: ONNX output shape {ours.shape} differs from torch {tuple(ref.shape)}")
        error = max(error, float(np.abs(ours - ref.numpy()).max()))
    return error
