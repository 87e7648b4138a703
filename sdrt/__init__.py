"""sdrt: an ahead-of-time compiled inference runtime for Stable Diffusion 1.x / 2.x.

The runtime (this package at import, `sdrt generate`) needs NumPy, Pillow, tokenizers and
the engine backend's runtime; never torch.
"""

__version__ = "0.1.0"
