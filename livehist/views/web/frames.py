"""The binary WebSocket frames of the web view (decoded by static/livehist.js).

    uint32 little-endian  H, the header's length in bytes
    H bytes               the header: UTF-8 JSON (kind, device, name, dtype, shape, t_pub, t_sent...)
    0-7 bytes             padding, so that the array starts at a multiple of 8
    the array             little-endian, C order, `dtype` and `shape` from the header

Spectra travel as float64 (exact to 2^53 counts). Images of counts travel as the smallest
unsigned integer type that holds their largest count ("u1", "u2" or "u4": exact, and a quarter
or half of float32's bytes while counts are small), images of other values or of counts from
2^32 as float32 ("f4": a colour scale needs no more). With 10 sessions at 10 Hz, a 512x512
preview as float32 was 100 MB/s through the service. Status, configuration and metadata
frames have no array.
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
        array = np.asarray(array)
        kind = _wire_type(array)
        array = np.ascontiguousarray(array, dtype="<" + kind)
        header["dtype"] = kind
        header["shape"] = list(array.shape)
        body = array.reshape(-1).view(np.uint8)  # its bytes, copied once, by the join
    text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_plain).encode()
    pad = -(4 + len(text)) % ALIGN
    return b"".join((struct.pack("<I", len(text)), text, b" " * pad, body))


def _wire_type(array: np.ndarray) -> str:
    """f8 for spectra; for images, the smallest unsigned type holding integer counts, else f4."""
    if array.ndim != 2:
        return "f8"
    if array.dtype.kind in "iub" and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0:
            for kind, top in (("u1", 0xFF), ("u2", 0xFFFF), ("u4", 0xFFFFFFFF)):
                if high <= top:
                    return kind
    elif array.dtype.kind in "iub":  # empty
        return "u1"
    return "f4"


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
