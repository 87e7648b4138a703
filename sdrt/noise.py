"""Gaussian noise for the sampling loop, without torch.

`TorchCompatibleNoise` reproduces `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`
on the CPU: torch's CPU generator is an MT19937 seeded like NumPy's legacy `RandomState(seed)`.
  - numel >= 16: every element gets a float32 uniform (the low 24 bits of one 32-bit draw / 2**24),
    then Box-Muller runs over blocks of 16, pairing element j with j + 8. When numel is not a
    multiple of 16, the last 16 elements are drawn again and transformed as one more block.
  - numel < 16: each element is a float64 normal from two 53-bit uniforms (Box-Muller, the sine
    half cached for the next element), cast to float32.
Consecutive calls continue the same stream, as consecutive torch.randn calls on one generator do.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SdrtError

NOISE_KINDS = ("torch", "numpy")


class TorchCompatibleNoise:
    def __init__(self, seed: int):
        if not 0 <= seed < 2**32:
            raise SdrtError(f"--seed {seed} is out of range: accepted values are 0 .. {2**32 - 1}")
        self._mt = np.random.RandomState(seed)
        self._cached_normal: float | None = None

    def _uint32(self, n: int) -> np.ndarray:
        return self._mt.randint(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32) if n else np.empty(0, np.uint32)

    def _uniform24(self, n: int) -> np.ndarray:
        # (n,) float32 in [0, 1): torch's uniform_real_distribution<float>
        return ((self._uint32(n) & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)

    @staticmethod
    def _box_muller16(u: np.ndarray) -> np.ndarray:
        # u: (blocks, 16) float32 uniforms -> (blocks, 16) float32 normals
        u1 = np.float32(1.0) - u[:, :8]
        u2 = u[:, 8:]
        radius = np.sqrt(np.float32(-2.0) * np.log(u1))
        theta = np.float32(2.0 * math.pi) * u2
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)

    def _scalar_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        words = self._uint32(4).astype(np.uint64)
        # random64() = (first << 32) | second; 53 low bits / 2**53
        u1, u2 = (float(((words[k] << np.uint64(32)) | words[k + 1]) & np.uint64((1 << 53) - 1)) * 2.0**-53 for k in (0, 2))
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32).reshape(shape)
        out = self._uniform24(n)
        full = n // 16 * 16
        out[:full] = self._box_muller16(out[:full].reshape(-1, 16)).reshape(-1)
        if n != full:
            out[n - 16 :] = self._box_muller16(self._uniform24(16).reshape(1, 16)).reshape(-1)
        return out.reshape(shape)


class NumpyNoise:
    def __init__(self, seed: int):
        if seed < 0:
            raise SdrtError(f"--seed {seed} is out of range: accepted values are integers >= 0")
        self._rng = np.random.default_rng(seed)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=np.float32)


class PerImageNoise:
    """Image i of a batch drawn from its own generator seeded seed + i (the AUTOMATIC1111 WebUI's way),
    so that each image can be made again alone."""

    def __init__(self, generators: list):
        self._generators = generators

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """shape: (n, ...) with n the number of generators."""
        return np.concatenate([g.randn((1, *shape[1:])) for g in self._generators])


BATCH_NOISE = ("shared", "per-image")


def make_batch_noise(kind: str, seed: int, mode: str, images: int) -> TorchCompatibleNoise | NumpyNoise | PerImageNoise:
    """shared: one generator for the whole batch (diffusers' way, the default); per-image: seed + i for image i."""
    if mode == "shared":
        return make_noise(kind, seed)
    if mode == "per-image":
        return PerImageNoise([make_noise(kind, seed + i) for i in range(images)])
    raise SdrtError(f"--batch-noise {mode!r} is not supported: accepted values are {', '.join(BATCH_NOISE)}")


def make_noise(kind: str, seed: int) -> TorchCompatibleNoise | NumpyNoise:
    if kind == "torch":
        return TorchCompatibleNoise(seed)
    if kind == "numpy":
        return NumpyNoise(seed)
    raise SdrtError(f"--noise {kind!r} is not supported: accepted values are {', '.join(NOISE_KINDS)}")
