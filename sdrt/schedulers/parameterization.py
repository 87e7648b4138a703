"""What the U-Net predicts (epsilon, v or the sample) turned into the clean-sample estimate x0.

Two forms, written as diffusers writes them so that results match element-wise:
  - variance preserving, x_t = alpha_t x0 + sigma_t eps      (DDIM, PNDM, DPM-Solver)
  - variance exploding (Karras), x = x0 + sigma eps, with the U-Net fed x / sqrt(sigma^2 + 1)
                                                              (Euler, Euler ancestral, LMS)
"""

from __future__ import annotations

import numpy as np


def vp_x0(model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t, prediction_type: str) -> np.ndarray:
    """x0 = (x_t - sigma_t eps) / alpha_t; for v: x0 = alpha_t x_t - sigma_t v."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    return model_output


def vp_eps(model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t, prediction_type: str) -> np.ndarray:
    """eps from the U-Net output; for v: eps = alpha_t v + sigma_t x_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    return (sample - alpha_t * model_output) / sigma_t


def ve_x0(model_output: np.ndarray, sample: np.ndarray, sigma, prediction_type: str) -> np.ndarray:
    """x0 in the Karras form: x - sigma eps; for v: -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output
