"""Spatial tiling: an engine run on overlapping tiles of its image-shaped input, the outputs blended with
linear ramps across the overlaps (MultiDiffusion's averaging, Bar-Tal et al. 2023, per denoising step for
the U-Net; the same for the VAE decoder). Peak memory then follows the tile, not the image; the cost is
that each tile sees only its own context, which the report of every tiled path measures. And the batch
split (OneAtATime): each sample run alone, which costs nothing in context."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import SdrtError


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size), neighbours overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(start: int, length: int, size: int, overlap: int) -> np.ndarray:
    """(length,) float32 weights: rising over `overlap` where a tile has a neighbour before it, falling where after."""
    w = np.ones(length, dtype=np.float32)
    if overlap:
        rise = np.arange(1, overlap + 1, dtype=np.float32) / np.float32(overlap + 1)
        if start > 0:
            w[:overlap] = np.minimum(w[:overlap], rise)
        if start + length < size:
            w[-overlap:] = np.minimum(w[-overlap:], rise[::-1])
    return w


class TiledEngine:
    """Runs `engine` tile by tile over the last two dims of feeds[input_name] (other feeds pass whole)
    and assembles outputs[output_name], whose spatial size is `scale` times the input's."""

    def __init__(self, engine, input_name: str, output_name: str, tile: int, overlap: int, scale: int = 1):
        if not 0 <= overlap < tile:
            raise SdrtError(f"tile overlap {overlap} must be >= 0 and smaller than the tile ({tile})")
        self.engine, self.input_name, self.output_name = engine, input_name, output_name
        self.tile, self.overlap, self.scale = tile, overlap, scale

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds[self.input_name]  # (B, C, H, W)
        height, width = x.shape[-2:]
        if height <= self.tile and width <= self.tile:
            return self.engine.run(feeds)
        s, out, total = self.scale, None, np.zeros((height * self.scale, width * self.scale), dtype=np.float32)
        for y in tile_starts(height, self.tile, self.overlap):
            for x0 in tile_starts(width, self.tile, self.overlap):
                th, tw = min(self.tile, height), min(self.tile, width)
                part = self.engine.run({**feeds, self.input_name: np.ascontiguousarray(x[..., y : y + th, x0 : x0 + tw])})[self.output_name]
                if out is None:
                    out = np.zeros((*part.shape[:-2], height * s, width * s), dtype=np.float32)
                weight = np.outer(_ramp(y * s, th * s, height * s, self.overlap * s), _ramp(x0 * s, tw * s, width * s, self.overlap * s))
                out[..., y * s : (y + th) * s, x0 * s : (x0 + tw) * s] += part * weight
                total[y * s : (y + th) * s, x0 * s : (x0 + tw) * s] += weight
        return {self.output_name: out / total}

    def close(self) -> None:
        self.engine.close()


class VaeTiledDecoder:
    """The VAE decoder on latent tiles as diffusers' AutoencoderKL.tiled_decode (`enable_tiling`): tiles of
    sample_size / scale latent pixels every 3/4 of that, each decoded tile blended linearly into its upper and left
    neighbours over a quarter of sample_size pixels, then cropped to the other 3/4. Latents no larger than a tile
    are decoded whole, as diffusers does. Peak memory then follows the tile, not the image."""

    OVERLAP = 0.25  # diffusers' tile_overlap_factor

    def __init__(self, engine, sample_size: int, scale: int):
        self.engine = engine
        self.tile = sample_size // scale  # diffusers' tile_latent_min_size
        self.stride = int(self.tile * (1 - self.OVERLAP))
        self.blend = int(sample_size * self.OVERLAP)
        self.keep = sample_size - self.blend  # diffusers' row_limit

    def _blend(self, before: np.ndarray, tile: np.ndarray, axis: int) -> np.ndarray:
        """tile's first `blend` rows (axis -2) or columns (-1) ramped in from the last ones of `before`."""
        extent = min(before.shape[axis], tile.shape[axis], self.blend)
        ramp = np.arange(extent) / extent  # (extent,) float64, as diffusers' y / blend_extent
        shape = (extent, 1) if axis == -2 else (extent,)
        head = [slice(None)] * 2 + ([slice(0, extent)] if axis == -2 else [slice(None), slice(0, extent)])
        tail = [slice(None)] * 2 + ([slice(-extent, None)] if axis == -2 else [slice(None), slice(-extent, None)])
        tile = tile.copy()
        tile[tuple(head)] = (before[tuple(tail)] * (1 - ramp).reshape(shape) + tile[tuple(head)] * ramp.reshape(shape)).astype(np.float32)
        return tile

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        z = feeds["latent_sample"]  # (B, C, h, w)
        if z.shape[-1] <= self.tile and z.shape[-2] <= self.tile:
            return self.engine.run(feeds)
        rows = [[self.engine.run({"latent_sample": np.ascontiguousarray(z[:, :, i : i + self.tile, j : j + self.tile])})["sample"]
                 for j in range(0, z.shape[3], self.stride)] for i in range(0, z.shape[2], self.stride)]
        out_rows = []
        for r, row in enumerate(rows):
            kept = []
            for c, tile in enumerate(row):
                if r > 0:
                    tile = self._blend(rows[r - 1][c], tile, -2)
                if c > 0:
                    tile = self._blend(row[c - 1], tile, -1)
                row[c] = tile  # the next tiles blend with this one as blended, as diffusers' in-place blend does
                kept.append(tile[:, :, : self.keep, : self.keep])
            out_rows.append(np.concatenate(kept, axis=3))
        return {"sample": np.concatenate(out_rows, axis=2)}  # (B, 3, H, W)

    def close(self) -> None:
        self.engine.close()


class OneAtATime:
    """Runs `engine` on one sample of the batch at a time (every feed's first dim) and stacks the outputs: the
    working memory of batch 1 (--low-memory's U-Net: the guidance halves one after the other)."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [self.engine.run({name: value[k : k + 1] for name, value in feeds.items()}) for k in range(len(feeds["sample"]))]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def close(self) -> None:
        self.engine.close()
