"""Noise schedules and timestep spacings shared by the schedulers, computed as diffusers does.

diffusers builds its tables in float32 torch; the functions here reproduce that arithmetic in
NumPy (float32 where torch is float32, float64 where diffusers goes through NumPy) so that the
schedulers match diffusers element-wise.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SdrtError
from .config import CommonConfig


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace(start, end, steps, dtype=float32): float32 step, filled from both ends with a
    # fused multiply-add (one rounding: exact in float64 for float32 operands, then rounded).
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    head = np.float64(start32) + step * idx
    tail = np.float64(end32) - step * (steps - idx - 1)
    return np.where(idx < steps // 2, head, tail).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ],
        dtype=np.float32,
    )


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod accumulates float32 in double on the CPU
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """(n,) float32: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its first value."""
    alphas_bar_sqrt = np.sqrt(_cumprod(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(cfg: CommonConfig, terminal_floor: bool = False) -> np.ndarray:
    """(num_train_timesteps,) float32: the cumulative product of 1 - beta.

    `terminal_floor`: with zero terminal SNR, the sigma schedulers replace alpha_bar_T = 0 by 2**-24
    so that sigma_max stays finite (4096), as diffusers does; DDIM keeps the 0."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    cumprod = _cumprod(np.float32(1.0) - betas)
    if cfg.rescale_betas_zero_snr and terminal_floor:
        cumprod[-1] = np.float32(2.0**-24)
    return cumprod


def vp_add_noise(alphas_cumprod: np.ndarray, t: float, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """diffusers' DDPM-form add_noise in float32: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    a = alphas_cumprod[int(t)]
    return a ** np.float32(0.5) * x0 + (np.float32(1.0) - a) ** np.float32(0.5) * noise


def karras_sigma_table(cumprod: np.ndarray) -> np.ndarray:
    """(num_train_timesteps,) float32: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    return (((np.float32(1.0) - cumprod) / cumprod) ** np.float32(0.5)).astype(np.float32)


def check_steps(num_steps: int, cfg: CommonConfig) -> None:
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise SdrtError(f"--steps {num_steps} is out of range: accepted values are 1 .. {cfg.num_train_timesteps}")


def spaced_timesteps(cfg: CommonConfig, num_steps: int, integer: bool) -> np.ndarray:
    """(num_steps,) descending timesteps for the config's `timestep_spacing`.

    `integer`: DDIM/PNDM round linspace spacing to int64; the sigma schedulers keep it fractional.
    """
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        if integer:
            return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ratio = T // num_steps
        t = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64 if integer else np.float32)
        return t + cfg.steps_offset
    ratio = T / num_steps
    t = np.round(np.arange(T, 0, -ratio)).astype(np.int64 if integer else np.float32)
    return t - 1


def interp_sigmas(timesteps: np.ndarray, sigma_table: np.ndarray) -> np.ndarray:
    """(n,) float64: sigma at (possibly fractional) timesteps, linear in t."""
    return np.interp(timesteps, np.arange(0, len(sigma_table)), sigma_table)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """(num_steps,) float64: Karras et al. 2022, eq. (5)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
    """(n,) float64: the fractional timestep whose log-sigma interpolates to each sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigma_table[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigma_table.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigma_table[low_idx], log_sigma_table[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def distillation_timesteps(cfg: CommonConfig, origin_steps: int, num_steps: int, strength: float, name: str) -> np.ndarray:
    """(num_steps,) int64 descending: the timesteps of consistency samplers (LCM, TCD), evenly spaced indices into
    the distillation schedule of `origin_steps` steps, which img2img's strength shortens (diffusers' arithmetic)."""
    if not 0 < strength <= 1:
        raise SdrtError(f"--strength {strength:g} is out of range: accepted values are 0 < strength <= 1")
    if not 1 <= origin_steps <= cfg.num_train_timesteps:
        raise SdrtError(f"scheduler config key 'original_inference_steps' = {origin_steps} must be 1 .. {cfg.num_train_timesteps}")
    origin = np.arange(1, int(origin_steps * strength) + 1) * (cfg.num_train_timesteps // origin_steps) - 1  # ascending
    if not 1 <= num_steps <= min(origin_steps, len(origin)):
        raise SdrtError(f"--steps {num_steps} is out of range for the {name} scheduler: accepted values are 1 .. {len(origin)} "
                        f"(the distillation schedule's {origin_steps} steps" + (f" times --strength {strength:g})" if strength < 1 else ")"))
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[::-1][indices]
