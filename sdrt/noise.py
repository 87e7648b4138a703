"""Gaussian noise for the sampling loop, without torch.

`TorchCompatibleNoise` reproduces `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`
on the CPU: torch's CPU generator is an MT19937 seeded like NumPy's legacy `RandomState(seed)`.
  - numel >= 16: every element gets a float32 uniform (the low 24 bits of one 32-bit draw / 2**24),
    then Box-Muller runs over blocks of 16, pairing element j with j + 8. When numel is not a
    multiple of 16, the last 16 elements are drawn again and transformed as one more block.
  - numel < 16: each element is a float64 normal from two 53-bit uniforms (Box-Muller, the sine
    half cached for the next element), cast to float32.
Consecutive calls continue the same stream, as consecutive torch.randn calls on one generator do.

`CppStdNoise` reproduces OpenVINO GenAI's `CppStdGenerator(seed)`, its default generator in C++: a
`std::mt19937(seed)` (NumPy's legacy `RandomState(seed)` is the same engine) read through one
`std::normal_distribution<float>` as GCC's libstdc++ implements it (Marsaglia's polar method): a float
uniform u = float(word) / 2**32 per draw (below 1), a pair x, y = 2u - 1 redrawn until 0 < x^2 + y^2 <= 1,
then y * m is returned and x * m kept for the next call, m = sqrt(-2 ln(r2) / r2), all in float32.
Other C++ standard libraries (MSVC's, libc++) implement the distribution differently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np

from .errors import SdrtError

NOISE_KINDS = ("torch", "numpy", "cpp-std")


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


def _c_logf():
    """The C library's float logarithm, which libstdc++'s std::log(float) calls: NumPy's float32 log differs from
    glibc's in the last bit for about 1 value in 10, the float64 log rounded to float32 for about 1 in 400."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        libm.logf.restype, libm.logf.argtypes = ctypes.c_float, [ctypes.c_float]
    except (OSError, AttributeError):
        return lambda x: np.log(x.astype(np.float64)).astype(np.float32)
    return lambda x: np.fromiter(map(libm.logf, x.tolist()), np.float32, len(x))


_logf = _c_logf()


class CppStdNoise:
    def __init__(self, seed: int):
        if not 0 <= seed < 2**32:
            raise SdrtError(f"--seed {seed} is out of range: accepted values are 0 .. {2**32 - 1}")
        self._mt = np.random.RandomState(seed)
        self._saved: np.float32 | None = None  # the distribution's cached second value

    def _pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` accepted (x, y) float32 pairs, consuming exactly the words the C++ loop would."""
        xs, ys = [np.empty(0, np.float32)], [np.empty(0, np.float32)]
        while count:
            state = self._mt.get_state()
            draws = 2 * (int(count / 0.78) + 8)  # enough pairs, most times (acceptance is pi / 4)
            words = self._mt.randint(0, 2**32, size=draws, dtype=np.uint64).astype(np.float32)  # rounded to float, as C++ does
            u = np.minimum(words * np.float32(2.0**-32), np.nextafter(np.float32(1), np.float32(0)))
            x, y = (np.float32(2) * u[0::2] - np.float32(1)), (np.float32(2) * u[1::2] - np.float32(1))
            r2 = x * x + y * y
            accepted = np.flatnonzero((r2 <= 1) & (r2 != 0))[:count]
            used = 2 * (int(accepted[-1]) + 1) if len(accepted) == count else draws
            self._mt.set_state(state)
            self._mt.randint(0, 2**32, size=used, dtype=np.uint64)  # advance by what was used
            xs.append(x[accepted])
            ys.append(y[accepted])
            count -= len(accepted)
        return np.concatenate(xs), np.concatenate(ys)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n, np.float32)
        start = 0
        if self._saved is not None and n:
            out[0], self._saved, start = self._saved, None, 1
        pairs = (n - start + 1) // 2
        x, y = self._pairs(pairs)
        r2 = x * x + y * y
        mult = np.sqrt(np.float32(-2) * _logf(r2) / r2)
        values = np.stack([y * mult, x * mult], axis=1).reshape(-1)  # y first, x kept
        out[start:] = values[: n - start]
        if (n - start) % 2:
            self._saved = values[-1]
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


def make_batch_noise(kind: str, seed: int, mode: str, images: int) -> TorchCompatibleNoise | NumpyNoise | CppStdNoise | PerImageNoise:
    """shared: one generator for the whole batch (diffusers' way, the default); per-image: seed + i for image i."""
    if mode == "shared":
        return make_noise(kind, seed)
    if mode == "per-image":
        return PerImageNoise([make_noise(kind, seed + i) for i in range(images)])
    raise SdrtError(f"--batch-noise {mode!r} is not supported: accepted values are {', '.join(BATCH_NOISE)}")


def make_noise(kind: str, seed: int) -> TorchCompatibleNoise | NumpyNoise | CppStdNoise:
    if kind == "torch":
        return TorchCompatibleNoise(seed)
    if kind == "numpy":
        return NumpyNoise(seed)
    if kind == "cpp-std":
        return CppStdNoise(seed)
    raise SdrtError(f"--noise {kind!r} is not supported: accepted values are {', '.join(NOISE_KINDS)}")
