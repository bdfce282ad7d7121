"""Event sources against hostile input: broken NeXus files, odd simulator parameters, bad hosts."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from livehist.engine import Engine
from livehist.engine.sources import SourceError, open_source
from livehist.engine.spec import parse_histograms

SPECS = [
    {"name": "t", "kind": "tof", "tof": {"start": 0, "stop": 1000, "bins": 10}},
    {"name": "i", "kind": "image", "pixels": {"first": 0, "shape": [4, 4]}},
]


def event_file(path, event_id, tof, pulse_time_s, index) -> str:
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g["event_id"] = event_id
        g["event_time_offset"] = tof
        g["event_time_offset"].attrs["units"] = "ns"
        g["event_time_zero"] = pulse_time_s
        g["event_time_zero"].attrs["units"] = "s"
        g["event_index"] = index
    return str(path)


def replay(uri: str, timeout: float = 60.0) -> Engine:
    src = open_source(uri)
    engine = Engine(parse_histograms(SPECS))
    engine.start(src)
    deadline = time.monotonic() + timeout
    while not src.finished and src.error is None and engine.fault is None and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert src.error is None and engine.fault is None, (src.error, engine.fault)
    return engine


def test_nexus_arrays_of_different_lengths_are_refused_not_half_counted(tmp_path):
    """event_time_offset with 10 fewer values than event_id: the last pulse's events were
    silently not counted (90 of 100, no error anywhere)."""
    n = 100
    for ids, tofs in ((n, n - 10), (n - 10, n)):
        path = event_file(tmp_path / f"m{ids}.nxs", np.arange(ids) % 16, np.arange(tofs) * 10,
                          np.arange(10) * 0.1, np.arange(10) * 10)  # fmt: skip
        with pytest.raises(SourceError, match=f"event_id has {ids} .*event_time_offset has {tofs}"):
            open_source(f"nexus://{path}?rate=max")
