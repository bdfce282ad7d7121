"""Display-sized views of large 2D histograms: exact block sums, never more than `limit` per side.

A 10^6-pixel image at 10 updates/s is 80 MB/s of change events; a panel shows a few
hundred pixels per side. The device offers `<name>_preview` (block sums) so displays
follow the detector at a quarter of the bytes or less, and the full image stays exact.
"""

from __future__ import annotations

import numpy as np

LIMIT = 512


def factor(shape: tuple[int, ...], limit: int = LIMIT) -> int:
    """Pixels per preview value along each axis (1: no preview needed)."""
    return int(np.ceil(max(shape) / limit)) if max(shape) > limit else 1


def blocks(shape: tuple[int, ...], limit: int = LIMIT) -> tuple[int, int]:
    """Block height and width: f x f, but a side shorter than f is one block ([1, N] -> 1 x f)."""
    f = factor(shape, limit)
    return max(1, min(f, shape[0])), max(1, min(f, shape[1]))  # an empty side: blocks of 1


def preview_shape(shape: tuple[int, ...], limit: int = LIMIT) -> tuple[int, int]:
    by, bx = blocks(shape, limit)
    return shape[0] // by, shape[1] // bx


def block_sum(image: np.ndarray, limit: int = LIMIT) -> np.ndarray:
    """Sums of f x f blocks (rows/columns beyond a whole block are left out; a side shorter
    than f is summed whole, so one-row and one-column images get a preview too)."""
    f = factor(image.shape, limit)
    if f == 1:
        return image
    by, bx = blocks(image.shape, limit)
    if (by, bx) != (f, f):
        ny, nx = (image.shape[0] // by) * by, (image.shape[1] // bx) * bx
        return image[:ny, :nx].reshape(ny // by, by, nx // bx, bx).sum(axis=(1, 3))
    if image.dtype.kind in "iu" and image.dtype.isnative and image.flags.c_contiguous:  # counts: compiled
        from livehist.engine.kernels import block_sum as kernel

        out = np.empty((image.shape[0] // f, image.shape[1] // f), np.int64)
        kernel(image, f, out)
        return out
    ny, nx = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    return image[:ny, :nx].reshape(ny // f, f, nx // f, f).sum(axis=(1, 3))
