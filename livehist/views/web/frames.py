"""The binary WebSocket frames of the web view (decoded by static/livehist.js).

    uint32 little-endian  H, the header's length in bytes
    H bytes               the header: UTF-8 JSON (kind, device, name, dtype, shape, t_pub, t_sent...)
    0-7 bytes             padding, so that the array starts at a multiple of 8
    the array             little-endian, C order, `dtype` ("f8" or "f4") and `shape` from the header

Spectra travel as float64 (exact to 2^53 counts), images as float32 (a colour scale needs no
more, and it halves the bytes); status, configuration and metadata frames have no array.
"""

from __future__ import annotations

import json
import struct
import time

import numpy as np

ALIGN = 8


def encode(header: dict, array: np.ndarray | None = None) -> bytes:
    """One frame; the header gets `t_sent` (epoch s), and `dtype`/`shape` when there is an array."""
    header = dict(header, t_sent=time.time())
    body = b""
    if array is not None:
        array = np.ascontiguousarray(array, dtype="<f4" if array.ndim == 2 else "<f8")
        header["dtype"] = "f4" if array.dtype.itemsize == 4 else "f8"
        header["shape"] = list(array.shape)
        body = array.tobytes()
    text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_plain).encode()
    pad = -(4 + len(text)) % ALIGN
    return struct.pack("<I", len(text)) + text + b" " * pad + body


def decode(frame: bytes) -> tuple[dict, np.ndarray | None]:
    """The inverse of `encode` (tests and the bench read frames with it)."""
    (n,) = struct.unpack_from("<I", frame)
    header = json.loads(frame[4 : 4 + n])
    start = 4 + n + (-(4 + n) % ALIGN)
    if "dtype" not in header:
        return header, None
    array = np.frombuffer(frame, "<" + header["dtype"], offset=start).reshape(header["shape"])
    return header, array


def _plain(value):
    """numpy scalars and other odd values in headers (a counter may arrive as numpy.int64)."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
