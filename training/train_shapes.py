"""Train sdrt's default model: a small Stable Diffusion (AutoencoderKL, CLIPTextModel from scratch,
UNet2DConditionModel) on the shapes grammar of `sdrt.shapes`, and write a diffusers folder.

    python training/train_shapes.py --work runs/shapes --out models/sdrt-shapes

Stages, each resumed from its checkpoint in --work when run again (so a run can continue in a
later session): vae -> latents (render the data set once, encode it) -> unet (text encoder and
U-Net together, with EMA) -> export (fp16 safetensors, tokenizer, scheduler, sdrt.json defaults).
Seeded and CPU-only. Held-out color+shape pairs (sdrt.shapes.HELD_OUT) never appear in training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.exporters.clip_vocab import learn_merges, write_tokenizer
from sdrt.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, caption, random_scene, render
from sdrt.tokenizer import CLIPTokenizer as SdrtTokenizer

SIDE = 64  # image side; the VAE reduces 8x as SD's does -> 8x8x4 latents
MAX_TOKENS = 16
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DEFAULTS = {"height": SIDE, "width": SIDE, "steps": 20, "guidance": 5.0, "scheduler": "dpmpp_2m"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                         sample_size=SIDE, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def make_text_encoder(vocab_size: int, bos: int, eos: int, pad: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                        num_hidden_layers=3, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                                        projection_dim=128, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIDE // 8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )


def images_tensor(scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, SIDE, SIDE) float32 in [-1, 1]."""
    batch = np.stack([render(s, SIDE, rng) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_vae(work: Path, steps: int, batch: int, seed: int) -> AutoencoderKL:
    ckpt = work / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step, rng = 0, np.random.default_rng(seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, step {step}/{steps}")
    vae.train()
    last_save = time.time()
    while step < steps:
        x = images_tensor([random_scene(rng) for _ in range(batch)], rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer_step(opt, loss, list(vae.parameters()), lr_at(step, steps, 1e-3))
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
        if step == steps or time.time() - last_save > 120:
            save(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
            last_save = time.time()
    return vae.eval()


def finetune_decoder(work: Path, vae: AutoencoderKL, steps: int, batch: int, seed: int) -> AutoencoderKL:
    """Sharpen the decoder with the encoder frozen: the latents the U-Net learns stay valid."""
    ckpt = work / "vae_decoder.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4)
    step, rng = 0, np.random.default_rng(seed + 3)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
    log(f"decoder fine-tuning: step {step}/{steps}")
    last_save = time.time()
    while step < steps:
        x = images_tensor([random_scene(rng) for _ in range(batch)], rng)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        optimizer_step(opt, loss, params, lr_at(step, steps, 3e-4, warmup=20))
        step += 1
        if step % 50 == 0:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
        if step == steps or time.time() - last_save > 120:
            save(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
            last_save = time.time()
    return vae.eval()


def encode_dataset(work: Path, vae: AutoencoderKL, count: int, seed: int) -> dict:
    path = work / "latents.npz"
    if path.exists():
        return dict(np.load(path))
    rng = np.random.default_rng(seed + 1)
    scenes = [random_scene(rng) for _ in range(count)]
    moments = []
    with torch.no_grad():
        for start in range(0, count, 256):
            moments.append(vae.encode(images_tensor(scenes[start : start + 256], rng)).latent_dist.parameters.numpy())
    moments = np.concatenate(moments)  # (N, 8, 8, 8): mean and log-variance
    mean, logvar = np.split(moments, 2, axis=1)
    samples = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape)
    data = {
        "moments": moments.astype(np.float32),
        "scaling_factor": np.float32(1.0 / samples.std()),
        "attributes": np.array([[list(COLORS).index(s.color), SHAPES.index(s.shape), list(BACKGROUNDS).index(s.background),
                                 SIZES.index(s.size), list(POSITIONS).index(s.position)] for s in scenes], dtype=np.int64),
    }
    np.savez(path, **data)
    log(f"latents: {count} images encoded, scaling factor {float(data['scaling_factor']):.4f}")
    return data


def grammar_texts() -> list[str]:
    return [caption(Scene(c, s, b, z, p), ws, wp) for c in COLORS for s in SHAPES for b in BACKGROUNDS for z in SIZES
            for p in POSITIONS for ws in (True, False) for wp in (True, False)]


def random_caption(attr: np.ndarray, rng: np.random.Generator) -> str:
    if rng.random() < 0.1:  # unconditional, for classifier-free guidance
        return ""
    scene = Scene(list(COLORS)[attr[0]], SHAPES[attr[1]], list(BACKGROUNDS)[attr[2]], SIZES[attr[3]], list(POSITIONS)[attr[4]])
    return caption(scene, with_size=rng.random() < 0.5, with_position=rng.random() < 0.6)


def train_unet(work: Path, data: dict, steps: int, batch: int, minutes: float, seed: int, prediction_type: str,
               init: Path | None, zero_snr: bool):
    tokenizer = SdrtTokenizer(work / "tokenizer")
    text_encoder = make_text_encoder(len(json.loads((work / "tokenizer" / "vocab.json").read_text())), tokenizer.bos_id,
                                     tokenizer.eos_id, tokenizer.pad_id)
    unet = make_unet()
    ema_text, ema_unet = make_text_encoder(text_encoder.config.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id), make_unet()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ckpt = work / ("unet.pt" if prediction_type == "epsilon" else f"unet-{prediction_type}{'-zero-snr' * zero_snr}.pt")
    step, rng = 0, np.random.default_rng(seed + 2)
    if not ckpt.exists() and init is not None:  # start from another run's EMA weights (e.g. an epsilon run)
        state = torch.load(init, weights_only=False)
        unet.load_state_dict(state["ema_unet"]), text_encoder.load_state_dict(state["ema_text"])
        log(f"unet: starting from the weights of {init} (its step {state['step']})")
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"]), opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        step, rng = state["step"], state["rng"]
    else:
        ema_unet.load_state_dict(unet.state_dict()), ema_text.load_state_dict(text_encoder.state_dict())
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters, {prediction_type}, step {step}/{steps}")
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    if zero_snr:  # the last step's input is pure noise: the layout has to come from the prompt
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    moments, attributes = torch.from_numpy(data["moments"]), data["attributes"]
    scale = float(data["scaling_factor"])
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))

    def checkpoint() -> None:
        save(ckpt, unet=unet.state_dict(), text=text_encoder.state_dict(), opt=opt.state_dict(), step=step, rng=rng,
             ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict())

    started, last_save = time.time(), time.time()
    unet.train(), text_encoder.train()
    while step < steps and (time.time() - started) < minutes * 60:
        idx = rng.integers(0, len(attributes), size=batch)
        mean, logvar = moments[idx].chunk(2, dim=1)
        x0 = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scale
        ids = torch.from_numpy(tokenizer([random_caption(attributes[i], rng) for i in idx]).astype(np.int64))
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        # v-prediction gives the high-noise steps, where the layout is decided, the weight of the others (epsilon
        # prediction gives them almost none); tried for position on this model, it did not help (see the model card)
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(pred, target)
        optimizer_step(opt, loss, params, lr_at(step, steps, 1e-3, warmup=200))
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in ema_pairs:
                ema_p.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
        if time.time() - last_save > 120:
            checkpoint()
            last_save = time.time()
    checkpoint()
    return ema_text.eval(), ema_unet.eval(), step


def export(work: Path, out: Path, vae: AutoencoderKL, text_encoder, unet, scale: float, prediction_type: str, zero_snr: bool,
           meta: dict) -> None:
    vae.register_to_config(scaling_factor=scale)
    # zero terminal SNR samples from t = 999 (trailing spacing), as Lin et al. 2023 prescribe
    spacing = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {"steps_offset": 1}
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS, prediction_type=prediction_type, **spacing)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (out / "tokenizer" / name).write_bytes((work / "tokenizer" / name).read_bytes())
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    rng = np.random.default_rng(123)
    prompts = {"calibration": [caption(random_scene(rng)) for _ in range(8)], "evaluation": [caption(random_scene(rng)) for _ in range(4)]}
    (out / "sdrt.json").write_text(json.dumps({"defaults": DEFAULTS, "prompts": prompts, "training": meta}, indent=2) + "\n")
    log(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--out", type=Path, default=Path("models/sdrt-shapes"))
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=24000, help="size of the encoded training set")
    parser.add_argument("--decoder-steps", type=int, default=1500, help="decoder fine-tuning after the latents are cached")
    parser.add_argument("--decoder-only", action="store_true", help="run the stages up to decoder fine-tuning, then stop")
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-minutes", type=float, default=60, help="stop the U-Net stage after this long (this run)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--zero-snr", action="store_true",
                        help="v_prediction only: betas rescaled to zero terminal SNR (Lin et al. 2023), trailing timesteps")
    parser.add_argument("--init-unet", type=Path, default=None,
                        help="U-Net checkpoint whose EMA weights start this U-Net stage (when it has no checkpoint yet)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.zero_snr and args.prediction_type != "v_prediction":
        parser.error("--zero-snr needs --prediction-type v_prediction (epsilon is undefined at zero SNR)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "tokenizer" / "vocab.json").exists():
        write_tokenizer(args.work / "tokenizer", learn_merges(grammar_texts()), model_max_length=MAX_TOKENS)
    started = time.time()
    vae = train_vae(args.work, args.vae_steps, args.vae_batch, args.seed)
    data = encode_dataset(args.work, vae, args.images, args.seed)
    vae = finetune_decoder(args.work, vae, args.decoder_steps, args.vae_batch, args.seed)
    if args.decoder_only:
        return
    text_encoder, unet, steps = train_unet(args.work, data, args.unet_steps, args.unet_batch, args.unet_minutes, args.seed,
                                           args.prediction_type, args.init_unet, args.zero_snr)
    meta = {"vae_steps": args.vae_steps, "vae_batch": args.vae_batch, "decoder_steps": args.decoder_steps, "images": args.images, "unet_steps": steps,
            "unet_batch": args.unet_batch, "prediction_type": args.prediction_type, "zero_snr": args.zero_snr, "init_unet": str(args.init_unet or ""),
            "seed": args.seed, "threads": args.threads}
    export(args.work, args.out, vae, text_encoder, unet, float(data["scaling_factor"]), args.prediction_type, args.zero_snr, meta)
    log(f"done in {(time.time() - started) / 60:.1f} min this run")


if __name__ == "__main__":
    main()
