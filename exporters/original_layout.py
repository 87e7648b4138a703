"""A diffusers Stable Diffusion model's weights in the original CompVis / Stability single-file layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`): the inverse of diffusers'
single-file conversion, so that tests and benchmarks can make checkpoints like the ones users
download from random-weight models. Checked by the round trip through diffusers' loader."""

from __future__ import annotations

import re

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_LAYERS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
               "conv_norm_out": "out.0", "conv_out": "out.2", "class_embedding.linear_1": "label_emb.0.0",
               "class_embedding.linear_2": "label_emb.0.2", "class_embedding": "label_emb"}
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
OPEN_CLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj"))


def _rename(name: str, pairs) -> str:
    for new, old in pairs:
        name = name.replace(new, old)
    return name


def unet_keys(unet) -> dict[str, torch.Tensor]:
    """model.diffusion_model.* from a UNet2DConditionModel."""
    per = unet.config.layers_per_block + 1  # input blocks per down level (resnets + downsampler), output blocks per up level
    out = {}
    for name, value in unet.state_dict().items():
        head, _, param = name.rpartition(".")
        if head in UNET_LAYERS:
            key = f"{UNET_LAYERS[head]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            key = f"input_blocks.{1 + block * per + layer}." + (f"0.{_rename(rest, RESNET)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            key = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name):
            key = f"middle_block.{2 * int(m[2])}.{_rename(m[3], RESNET)}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            key = f"output_blocks.{block * per + layer}." + (f"0.{_rename(rest, RESNET)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
            block = int(m[1])
            has_attention = hasattr(unet.up_blocks[block], "attentions")
            key = f"output_blocks.{block * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"no original name for the U-Net tensor {name}")
        out["model.diffusion_model." + key] = value
    return out


def vae_keys(vae) -> dict[str, torch.Tensor]:
    """first_stage_model.* from an AutoencoderKL (attention projections as 1x1 convolutions, as stored)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for name, value in vae.state_dict().items():
        key = name.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", name):
            key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
            key = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", name):
            key = f"encoder.down.{m[1]}.block.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", name):
            key = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", name):
            key = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
            key = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + key] = value
    return out


def clip_keys(text_encoder) -> dict[str, torch.Tensor]:
    """SD 1.x: cond_stage_model.transformer.text_model.* (the transformers names, with the `text_model.`
    prefix that checkpoints keep and transformers 5 drops)."""
    return {"cond_stage_model.transformer.text_model." + name.removeprefix("text_model."): value
            for name, value in text_encoder.state_dict().items()}


def open_clip_keys(text_encoder, extra_layer: bool) -> dict[str, torch.Tensor]:
    """SD 2.x: cond_stage_model.model.* in OpenCLIP's names (fused q/k/v, a text projection). `extra_layer`:
    add the 24th block that real SD 2 checkpoints carry and diffusers drops (the penultimate layer's output is used)."""
    prefix, out = "cond_stage_model.model.", {}
    state = {name.removeprefix("text_model."): value for name, value in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    layers = text_encoder.config.num_hidden_layers
    out[prefix + "token_embedding.weight"] = state.pop("embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = state.pop("embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        out[prefix + f"ln_final.{p}"] = state.pop(f"final_layer_norm.{p}")
    out[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)) / hidden**0.5
    for i in range(layers + (1 if extra_layer else 0)):
        source = i if i < layers else layers - 1  # the dropped block: a copy of the last one's shapes
        block = f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[block + f"attn.in_proj_{p}"] = torch.cat([state[f"encoder.layers.{source}.self_attn.{q}_proj.{p}"] for q in "qkv"])
        for name, value in state.items():
            if name.startswith(f"encoder.layers.{source}.") and "_proj." not in name.replace("out_proj.", ""):
                out[block + _rename(name.removeprefix(f"encoder.layers.{source}."), OPEN_CLIP)] = value
    return out


def original_state_dict(pipe, sd2: bool) -> dict[str, torch.Tensor]:
    """The whole checkpoint of a diffusers pipeline: U-Net, VAE and text encoder, contiguous tensors."""
    text = open_clip_keys(pipe.text_encoder, extra_layer=pipe.text_encoder.config.num_hidden_layers == 23) if sd2 else clip_keys(pipe.text_encoder)
    return {k: v.detach().contiguous() for k, v in {**unet_keys(pipe.unet), **vae_keys(pipe.vae), **text}.items()}
