"""Random-weight Stable Diffusion models in diffusers format, with the real CLIP tokenizer files.

They have the real architectures (UNet2DConditionModel, AutoencoderKL, CLIPTextModel); weights
are seeded, so a kind always gives the same model.
  sd1:  tiny (exports and runs in seconds): epsilon prediction, PNDM scheduler config,
        quick-GELU text encoder, 2x VAE
  sd2:  tiny: v-prediction, linear projections, upcast attention, GELU text encoder,
        pad token "!", DDIM scheduler config, 4x VAE
  sd1-inpaint, sd2-inpaint: the same with a 9-channel inpainting U-Net (StableDiffusionInpaintPipeline)
  sd2-depth: sd2 with a 5-channel depth-to-image U-Net and a tiny DPT depth estimator
        (StableDiffusionDepth2ImgPipeline)
  sd2-upscale: sd2 as the x4 upscaler: 7-channel U-Net with 1000 noise-level classes, x4 VAE,
        DDPM low-resolution scheduler (StableDiffusionUpscalePipeline)
  sd1-lcm: sd1 as an LCM-distilled model: the guidance scale's embedding enters the U-Net (time_cond_proj_dim),
        LCM scheduler config (LatentConsistencyModelPipeline)
  sd2-unclip: sd2 as Stable unCLIP: a tiny CLIP vision encoder whose noised embedding is the U-Net's
        projected class label (StableUnCLIPImg2ImgPipeline)
  sd15: the full-size SD 1.5 architecture (859.5 M-parameter U-Net, 3.4 GB in fp32), for speed
        and memory measurements: random weights run as fast as trained ones in fp32
  sd21-base, sd21-v: the full-size SD 2.1 architectures (OpenCLIP-H text encoder, linear
        projections; sd21-v: v-prediction at 768x768 with upcast attention)
  sd-x4-upscaler: the full-size x4 upscaler architecture (473 M-parameter 7-channel U-Net whose three
        outer levels attend to the text only, OpenCLIP-H, 3-level VAE), for speed and memory measurements
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, PNDMScheduler, StableDiffusionDepth2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableUnCLIPImg2ImgPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .clip_vocab import write_clip_tokenizer

KINDS = ("sd1", "sd2", "sd1-inpaint", "sd1-lcm", "sd2-inpaint", "sd2-depth", "sd2-upscale", "sd2-unclip", "sd15", "sd21-base", "sd21-v", "sd-x4-upscaler")
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def make_random_model(kind: str, out: Path, seed: int = 0) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: accepted values are {', '.join(KINDS)}")
    if kind in ("sd15", "sd21-base", "sd21-v"):
        return _make_full_size(kind, out, seed)
    if kind == "sd-x4-upscaler":
        return _make_full_size_upscaler(out, seed)
    sd2, inpaint, depth, upscale, unclip, lcm = (kind.startswith("sd2"),
                                                 *(kind.endswith(k) for k in ("-inpaint", "-depth", "-upscale", "-unclip", "-lcm")))
    torch.manual_seed(seed)
    hidden = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpaint else 5 if depth else 7 if upscale else 4,  # + mask and masked-image latents, depth, low-res image
        num_class_embeds=1000 if upscale else None,  # the upscaler's noise level
        class_embed_type="projection" if unclip else None,
        time_cond_proj_dim=32 if lcm else None,  # the guidance embedding (256 in LCM_Dreamshaper_v7)  # unCLIP: the noised image embedding and its level's embedding
        projection_class_embeddings_input_dim=2 * hidden if unclip else None,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(4, 8) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
    )
    vae_blocks = (32, 32, 64) if sd2 else (32, 64)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        block_out_channels=vae_blocks,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8 * 2 ** (len(vae_blocks) - 1),
        scaling_factor=0.18215,
    )
    if unclip:
        return _save(out, text_encoder, unet, vae, scheduler_for(kind), pad_token="!", pipeline=StableUnCLIPImg2ImgPipeline,
                     **_tiny_image_encoder(hidden))
    if upscale:
        vae.register_to_config(scaling_factor=0.08333)
        return _save(out, text_encoder, unet, vae, scheduler_for(kind), pad_token="!", pipeline=StableDiffusionUpscalePipeline,
                     low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
                     max_noise_level=350)
    if lcm:
        return _save(out, text_encoder, unet, vae, LCMScheduler(**SD_BETAS, set_alpha_to_one=True, original_inference_steps=50),
                     pad_token="<|endoftext|>", pipeline=LatentConsistencyModelPipeline)
    if depth:
        return _save(out, text_encoder, unet, vae, scheduler_for(kind), pad_token="!", pipeline=StableDiffusionDepth2ImgPipeline,
                     **_tiny_depth_estimator())
    return _save(out, text_encoder, unet, vae, scheduler_for(kind), pad_token="!" if sd2 else "<|endoftext|>",
                 pipeline=StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)


def _tiny_image_encoder(dim: int) -> dict:
    """unCLIP's image side: a tiny CLIP vision encoder (32x32, projection `dim`), its processor, a normalizer
    with drawn mean and std, and the cosine noising schedule of the real model."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                             image_size=32, patch_size=8, projection_dim=dim))
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=dim)
    with torch.no_grad():
        normalizer.mean.normal_(0.0, 0.5)
        normalizer.std.uniform_(0.5, 2.0)
    return {"feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            "image_encoder": encoder, "image_normalizer": normalizer,
            "image_noising_scheduler": DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")}


def _tiny_depth_estimator() -> dict:
    """A ViT-backbone DPT (the real SD 2 depth model uses DPT-Hybrid) at 32x32, whose head is re-drawn so
    that its depth is not all zero after the final ReLU, and its image processor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5]))
    for name, param in model.head.named_parameters():
        torch.nn.init.normal_(param, mean=0.2 if name.endswith("bias") else 0.0, std=0.3)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, keep_aspect_ratio=False)
    return {"depth_estimator": model, "feature_extractor": processor}


def scheduler_for(kind: str):
    if kind.startswith("sd2"):
        return DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1, timestep_spacing="leading")
    return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def _make_full_size(kind: str, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    sd2 = kind != "sd15"
    hidden = 1024 if sd2 else 768
    text_encoder = _open_clip_h() if sd2 else CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    unet = UNet2DConditionModel(  # diffusers' defaults are the SD 1.x U-Net
        sample_size=96 if kind == "sd21-v" else 64, cross_attention_dim=hidden,
        attention_head_dim=(5, 10, 20, 20) if sd2 else 8, use_linear_projection=sd2, upcast_attention=kind == "sd21-v")
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768 if kind == "sd21-v" else 512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    scheduler = scheduler_for("sd2") if kind == "sd21-v" else scheduler_for("sd1")
    return _save(out, text_encoder, unet, vae, scheduler, pad_token="!" if sd2 else "<|endoftext|>")


def _open_clip_h() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))


def _make_full_size_upscaler(out: Path, seed: int) -> Path:
    """stabilityai/stable-diffusion-x4-upscaler's architecture (its published configs) with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=7, out_channels=4, num_class_embeds=1000, block_out_channels=(256, 512, 512, 1024),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, True, False), attention_head_dim=8, cross_attention_dim=1024, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return _save(out, _open_clip_h(), unet, vae, scheduler, pad_token="!", pipeline=StableDiffusionUpscalePipeline,
                 low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
                 max_noise_level=350)


def _save(out: Path, text_encoder, unet, vae, scheduler, pad_token: str, pipeline=StableDiffusionPipeline, **extra) -> Path:
    tok_dir = out / "tokenizer"
    write_clip_tokenizer(tok_dir, pad_token=pad_token)
    safety = {} if extra else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=unet, scheduler=scheduler,
                    **safety, **extra)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(tok_dir, pad_token=pad_token)  # plain files, as hub folders have them
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight Stable Diffusion model folder.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_random_model(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
