"""Histograms as small value objects: one class per kind, same few methods.

    add(batch) -> events counted     clear()     data() -> counts copy     edges

Counts are int64 (exact for any run length). A sliding `window` keeps WINDOW_SLICES time
slices keyed by pulse time (not wall time, so replays window the same way as live data).
"""

from __future__ import annotations

import numpy as np

from livehist.engine import kernels
from livehist.engine.events import EventBatch
from livehist.engine.spec import WINDOW_SLICES, HistogramSpec


class Histogram:
    def __init__(self, spec: HistogramSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self._cells = int(np.prod(spec.data_shape))
        self._edges_cache: dict[tuple, tuple] = {}
        self.out_of_range = 0
        self.clear()

    # --- the interface -------------------------------------------------------------
    @property
    def edges(self) -> np.ndarray | None:
        return self.spec.tof.edges if self.spec.tof else None

    def clear(self) -> None:
        if self.spec.window:
            self._slices: dict[int, np.ndarray] = {}
            self._slice_ns = int(self.spec.window * 1e9 / WINDOW_SLICES)
            self._latest_slice = None
        self._counts = np.zeros(self._cells, dtype=np.int64)
        self.out_of_range = 0

    def add(self, batch: EventBatch) -> int:
        if not self.spec.window:
            inside = self._fill(batch, 0, len(batch), self._counts)
        else:
            inside = 0
            for ptime, start, stop in _group_pulses(batch, self._slice_ns):
                inside += self._fill(batch, start, stop, self._slice(ptime // self._slice_ns))
        self.out_of_range += len(batch) - inside
        return inside

    def data(self) -> np.ndarray:
        """A copy of the counts, shaped as clients see them."""
        if self.spec.window:
            total = np.zeros(self._cells, dtype=np.int64)
            for arr in self._slices.values():
                total += arr
        else:
            total = self._counts.copy()
        return total.reshape(self.spec.data_shape)

    # --- helpers -------------------------------------------------------------------
    def _slice(self, key: int) -> np.ndarray:
        if self._latest_slice is None or key > self._latest_slice:
            self._latest_slice = key
            for old in [k for k in self._slices if k <= key - WINDOW_SLICES]:
                del self._slices[old]
        if key <= self._latest_slice - WINDOW_SLICES:
            return np.zeros(self._cells, dtype=np.int64)  # older than the window: not kept
        arr = self._slices.get(key)
        if arr is None:
            arr = self._slices[key] = np.zeros(self._cells, dtype=np.int64)
        return arr

    def _tof(self, batch: EventBatch) -> tuple[np.ndarray, tuple]:
        """Edges in the batch's TOF unit and the kernels proven right for its dtype."""
        key = (batch.tof_unit, batch.tof.dtype)
        hit = self._edges_cache.get(key)
        if hit is None:
            edges = np.ascontiguousarray(self.spec.tof.edges_in(batch.tof_unit))
            mode = kernels.tof_mode(edges, self.spec.tof.scale, batch.tof.dtype)
            hit = self._edges_cache[key] = (edges, kernels.TOF_KERNELS[mode])
        return hit

    def _fill(self, batch: EventBatch, start: int, stop: int, counts: np.ndarray) -> int:
        raise NotImplementedError


def _group_pulses(batch: EventBatch, slice_ns: int):
    """(pulse_time, start, stop) runs of consecutive pulses that fall in one time slice."""
    run = None
    for ptime, start, stop in batch.pulse_slices():
        key = ptime // slice_ns
        if run and run[0] // slice_ns == key:
            run[2] = stop
        else:
            if run:
                yield tuple(run)
            run = [ptime, start, stop]
    if run:
        yield tuple(run)


class TofHistogram(Histogram):
    def _fill(self, batch, start, stop, counts):
        edges, k = self._tof(batch)
        return k[0](batch.tof[start:stop], edges, counts)


class ImageHistogram(Histogram):
    def _fill(self, batch, start, stop, counts):
        return kernels.hist_image(batch.pixel_id[start:stop], self.spec.first_pixel, self._cells, counts)


class PixelTofHistogram(Histogram):
    def _fill(self, batch, start, stop, counts):
        edges, k = self._tof(batch)
        return k[1](batch.pixel_id[start:stop], batch.tof[start:stop], self.spec.first_pixel,
                    self.spec.shape[0], edges, counts)  # fmt: skip


class RoiHistogram(Histogram):
    def __init__(self, spec: HistogramSpec) -> None:
        super().__init__(spec)
        self.mask = np.zeros(spec.pixel_count, dtype=np.uint8)
        self.mask[spec.roi_pixels - spec.first_pixel] = 1

    def _fill(self, batch, start, stop, counts):
        edges, k = self._tof(batch)
        return k[2](batch.pixel_id[start:stop], batch.tof[start:stop], self.spec.first_pixel,
                    self.mask, edges, counts)  # fmt: skip

    def total(self) -> int:
        return int(self.data().sum())


KIND_CLASSES = {
    "tof": TofHistogram,
    "image": ImageHistogram,
    "pixel_tof": PixelTofHistogram,
    "roi": RoiHistogram,
}


def make(spec: HistogramSpec) -> Histogram:
    return KIND_CLASSES[spec.kind](spec)
