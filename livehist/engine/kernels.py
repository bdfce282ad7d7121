"""Compiled histogramming kernels (numba, nogil so a receiver thread runs alongside).

Bins are half-open [edges[b], edges[b+1]) for every bin, the last one included. Three ways
to find a TOF bin, chosen per histogram and event dtype by `tof_mode`:
  FAST      one multiply; used only where `tof_mode` proved it exact for integer TOFs
  LINEAR    one multiply corrected by comparing with the neighbouring edges (as numpy does)
  SEARCH    binary search (log and explicit edges)
Every kernel returns how many events it counted; callers derive out-of-range counts.
"""

from __future__ import annotations

import numba
import numpy as np

FAST, LINEAR, SEARCH = 0, 1, 2


def tof_mode(edges: np.ndarray, scale: str, dtype: np.dtype) -> int:
    """FAST if the plain multiply bins every integer TOF exactly as the edges do.

    For integer t, `t >= e` <=> `t >= ceil(e)`, so bin k holds the integers
    ceil(e_k) .. ceil(e_k+1) - 1. floor((t - lo) * s) is monotonic in t, so checking it at
    both ends of every bin proves it right for every integer in between.
    """
    if scale != "linear":
        return SEARCH
    if not np.issubdtype(dtype, np.integer) or np.dtype(dtype).itemsize > 4:
        return LINEAR
    n = edges.size - 1
    lo = edges[0]
    s = n / (edges[n] - edges[0])
    first = np.ceil(edges).astype(np.float64)  # first integer of each bin (and of "past the end")
    k = np.arange(n + 1)
    at_first = ((first - lo) * s).astype(np.int64)
    before_first = ((first - 1 - lo) * s).astype(np.int64)
    ok = np.all(at_first[:-1] == k[:-1]) and at_first[-1] >= n
    ok = ok and np.all(before_first[1:] == k[:-1]) and np.all((first - 1)[:1] < lo)
    return FAST if ok else LINEAR


def _binner(mode: int):
    if mode == FAST:

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if x >= lo:
                b = np.int64((x - lo) * s)
                if b < n:
                    return b
            return -1

    elif mode == LINEAR:

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if not (x >= lo):  # also rejects NaN
                return -1
            b = np.int64((x - lo) * s)
            if b > n:
                b = n
            if x < edges[b]:
                b -= 1
            elif b < n and x >= edges[b + 1]:
                b += 1
            return b if b < n else -1

    else:

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if not (x >= lo):
                return -1
            b = np.searchsorted(edges, x, side="right") - 1
            return b if b < n else -1

    return bin_of


def _tof_kernels(mode: int):
    bin_of = _binner(mode)
    jit = numba.njit(nogil=True)

    @jit
    def hist_tof(tof, edges, counts):
        n = edges.size - 1
        lo = edges[0]
        s = n / (edges[n] - lo)
        inside = 0
        for i in range(tof.size):
            b = bin_of(tof[i], edges, lo, s, n)
            if b >= 0:
                counts[b] += 1
                inside += 1
        return inside

    @jit
    def hist_pixel_tof(pixel_id, tof, first, npix, edges, counts):
        n = edges.size - 1
        lo = edges[0]
        s = n / (edges[n] - lo)
        inside = 0
        for i in range(pixel_id.size):
            p = np.int64(pixel_id[i]) - first
            if p >= 0 and p < npix:
                b = bin_of(tof[i], edges, lo, s, n)
                if b >= 0:
                    counts[p * n + b] += 1
                    inside += 1
        return inside

    @jit
    def hist_roi(pixel_id, tof, first, mask, edges, counts):
        n = edges.size - 1
        lo = edges[0]
        s = n / (edges[n] - lo)
        npix = mask.size
        inside = 0
        for i in range(pixel_id.size):
            p = np.int64(pixel_id[i]) - first
            if p >= 0 and p < npix and mask[p]:
                b = bin_of(tof[i], edges, lo, s, n)
                if b >= 0:
                    counts[b] += 1
                    inside += 1
        return inside

    return hist_tof, hist_pixel_tof, hist_roi


TOF_KERNELS = {mode: _tof_kernels(mode) for mode in (FAST, LINEAR, SEARCH)}


@numba.njit(nogil=True, cache=True)
def hist_image(pixel_id, first, npix, counts):
    inside = 0
    for i in range(pixel_id.size):
        p = np.int64(pixel_id[i]) - first
        if p >= 0 and p < npix:
            counts[p] += 1
            inside += 1
    return inside


@numba.njit(nogil=True, cache=True)
def block_sum(image, f, out):
    """out[r, c] = sum of image[r*f:(r+1)*f, c*f:(c+1)*f] (one pass, row by row, no GIL)."""
    ny, nx = out.shape
    out[:] = 0
    for y in range(ny * f):
        row = out[y // f]
        src = image[y]
        for c in range(nx):
            total = np.int64(0)
            for x in range(c * f, c * f + f):
                total += src[x]
            row[c] += total
