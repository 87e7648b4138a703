"""Noise: torch-compatible normals against torch.randn for many shapes and seeds."""

import numpy as np
import pytest

from sdrt.errors import SdrtError
from sdrt.noise import NumpyNoise, make_noise

torch = pytest.importorskip("torch")

SHAPES = [(1,), (2,), (7,), (15,), (16,), (17,), (24,), (31,), (32,), (33,), (100,), (1, 4, 8, 8), (2, 4, 13, 7), (1, 4, 64, 64), (3, 4, 9, 11)]
SEEDS = [0, 1, 7, 42, 1234, 987654321, 2**31, 2**32 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_torch_randn(seed):
    ours = make_noise("torch", seed)
    ref = torch.Generator().manual_seed(seed)
    for shape in SHAPES:  # consecutive draws continue one stream, as the sampling loop uses it
        expected = torch.randn(shape, generator=ref).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-6, (seed, shape)


def test_numpy_noise_is_seeded_and_distinct_from_torch():
    a, b = NumpyNoise(5).randn((2, 4, 8, 8)), NumpyNoise(5).randn((2, 4, 8, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, make_noise("torch", 5).randn((2, 4, 8, 8)))


def test_bad_seed_and_kind():
    with pytest.raises(SdrtError, match="--seed -1"):
        make_noise("torch", -1)
    with pytest.raises(SdrtError, match="--seed 4294967296"):
        make_noise("torch", 2**32)
    with pytest.raises(SdrtError, match="--noise 'cuda'.*torch, numpy"):
        make_noise("cuda", 0)
