"""Histograms as small value objects, and the set that fills them all in one pass per batch.

    Histogram:     add(batch) -> events counted     clear()     data() -> counts copy     edges
    HistogramSet:  add(batch)  (every histogram of a device, one fused kernel, N threads)

Counts are exact int64. A histogram of STAGE_MIN_CELLS cells or more counts into a uint8
staging array carried into int64 every 256 counts (1/8 of the bytes to keep in cache); each of N
accumulating threads has its own partial counts, summed by `data()`. A sliding `window`
keeps WINDOW_SLICES time slices keyed by pulse time (not wall time, so replays window the
same way as live data); windowed histograms are filled on their own, one thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from livehist.engine import kernels
from livehist.engine.events import EventBatch
from livehist.engine.spec import WINDOW_SLICES, HistogramSpec, SpecError, size_text

STAGE_MIN_CELLS = 1 << 15  # smaller histograms stay in L1/L2 as int64 anyway
STAGE_DTYPE = np.uint8  # measured: 4x uint32, 10x int64 for 10^6 random cells on a loaded machine
MIN_SPLIT = 1 << 16  # batches smaller than this are not worth a second thread
MAX_THREADS = 64


def stage_of(spec: HistogramSpec) -> str:
    """The staging dtype of a histogram's counts ("": int64 counts directly)."""
    cells = int(np.prod(spec.data_shape))
    return "" if spec.window or cells < STAGE_MIN_CELLS else np.dtype(STAGE_DTYPE).name


def memory(spec: HistogramSpec, threads: int = 1) -> int:
    """Bytes a histogram of this spec holds: its counts in each accumulating thread's part (int64,
    plus the staging array of a large one), or a window's slices, and an ROI's pixel mask and ids."""
    if spec.window:
        return spec.nbytes
    cells = int(np.prod(spec.data_shape))
    stage = stage_of(spec)
    part = (cells + kernels.SPARE) * (np.dtype(stage).itemsize + 8) if stage else (cells + 1) * 8
    return part * threads + spec.nbytes - cells * 8


def check_memory(specs: list[HistogramSpec], threads: int, limit: int, label: str) -> None:
    """SpecError if these histograms would hold more than `limit` bytes with `threads` threads."""
    need = {s.name: memory(s, threads) for s in specs}
    total = sum(need.values())
    if total > limit:
        big = max(need, key=need.get)
        raise SpecError(
            f"{label} need {size_text(total)} of memory (int64 counts, the staging counts of large "
            f"histograms, {threads} accumulating thread{'s' if threads > 1 else ''}), over the "
            f"MaxHistogramBytes limit of {size_text(limit)} (largest: {big}, {size_text(need[big])}); "
            "use fewer bins/pixels" + (" or AccumulatingThreads" if threads > 1 else "")
            + ", or raise MaxHistogramBytes"
        )  # fmt: skip


class Histogram:
    def __init__(self, spec: HistogramSpec, threads: int = 1) -> None:
        self.spec = spec
        self.name = spec.name
        self._cells = int(np.prod(spec.data_shape))
        self.stage = stage_of(spec)
        self.threads = 1 if spec.window else threads
        self.mask = None
        if spec.kind == "roi":  # one bit per pixel of the ROI's span, from its first pixel
            ids = spec.roi_pixels
            self._roi_first, span = int(ids.min()), spec.roi_span
            bits = np.zeros(span, dtype=bool)
            bits[ids - self._roi_first] = True
            self.mask = np.packbits(bits, bitorder="little")
            self._roi_span = span
        self.out_of_range = 0
        self._alone: HistogramSet | None = None
        self._window_plans: dict[tuple, tuple] = {}
        self.clear()

    # --- the interface -------------------------------------------------------------
    @property
    def edges(self) -> np.ndarray | None:
        return self.spec.tof.edges if self.spec.tof else None

    @property
    def nbytes(self) -> int:
        """Memory of the counts (all partials, staging included; windowed: the slices held)."""
        if self.spec.window:
            return sum(a.nbytes for a in self._slices.values())
        return sum(a.nbytes for part in self.parts for a in part)

    def clear(self) -> None:
        if self.spec.window:
            self._slices: dict[int, np.ndarray] = {}
            self._slice_ns = int(self.spec.window * 1e9 / WINDOW_SLICES)
            self._latest_slice = None
            self.parts: list[tuple[np.ndarray, ...]] = []
        else:  # per thread: (counts,) or (staging, carry); new arrays, so a snapshot never sees a half-clear
            self.parts = [self._new_part() for _ in range(self.threads)]
        self.out_of_range = 0

    def take_counts(self, old: Histogram) -> None:
        """Go on counting where `old` (a histogram of the same binning, being replaced) is."""
        if self.spec.window:
            self._slices, self._latest_slice = old._slices, old._latest_slice
        elif len(old.parts) == len(self.parts) and old.stage == self.stage:
            self.parts = old.parts
        else:
            return
        self.out_of_range = old.out_of_range

    def add(self, batch: EventBatch) -> int:
        """Histogram one batch (alone; a device's histograms go through one HistogramSet)."""
        if self._alone is None:
            self._alone = HistogramSet([self], self.threads)
        before = self.out_of_range
        self._alone.add(batch)
        return len(batch) - (self.out_of_range - before)

    def data(self) -> np.ndarray:
        """A copy of the counts, shaped as clients see them."""
        if self.spec.window:
            total = np.zeros(self._cells, dtype=np.int64)
            for arr in self._slices.values():
                total += arr[: self._cells]
        else:
            parts = list(self.parts)
            total = parts[0][-1][: self._cells].copy()  # the int64 array of the first part
            if self.stage:
                total += parts[0][0][: self._cells]
            for part in parts[1:]:
                for arr in part:
                    total += arr[: self._cells]
        return total.reshape(self.spec.data_shape)

    def total(self) -> int:
        return int(self.data().sum())

    # --- helpers -------------------------------------------------------------------
    def _new_part(self) -> tuple[np.ndarray, ...]:
        if self.stage:
            n = self._cells + kernels.SPARE  # + the kernel's spare cells for events outside
            return np.zeros(n, dtype=self.stage), np.zeros(n, dtype=np.int64)
        return (np.zeros(self._cells + 1, dtype=np.int64),)  # + the kernel's spare cell for events outside

    def _slot_args(self, part: tuple[np.ndarray, ...]) -> list:
        """This histogram's arguments of a fused kernel, after the axes' edges."""
        s = self.spec
        if s.kind == "roi":
            return [self._roi_first, self._roi_span, self.mask, *part]
        pixels = [] if s.kind == "tof" else [s.first_pixel, s.pixel_count]
        return [*pixels, *part]

    def _slice(self, key: int) -> np.ndarray:
        if self._latest_slice is None or key > self._latest_slice:
            self._latest_slice = key
            for old in [k for k in self._slices if k <= key - WINDOW_SLICES]:
                del self._slices[old]
        if key <= self._latest_slice - WINDOW_SLICES:
            return np.zeros(self._cells + 1, dtype=np.int64)  # older than the window: not kept
        arr = self._slices.get(key)
        if arr is None:
            arr = self._slices[key] = np.zeros(self._cells + 1, dtype=np.int64)  # + the spare cell
        return arr


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


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least n helper threads (the kernels release the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            old, _pool = _pool, ThreadPoolExecutor(n, thread_name_prefix="livehist-accumulate")
            if old is not None:
                old.shutdown(wait=False)
        return _pool


class HistogramSet:
    """All histograms of a device, filled by one generated kernel: one pass over each batch.

    With threads > 1, a large batch is cut into `threads` ranges, each counted by its own
    thread into its own partial counts (memory: `threads` times the counts)."""

    def __init__(self, hists: list[Histogram], threads: int = 1) -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"accumulating threads must be 1..{MAX_THREADS}, got {threads}")
        self.hists = list(hists)
        self.threads = threads
        self._fused = [h for h in self.hists if not h.spec.window]
        self._windowed = [h for h in self.hists if h.spec.window]
        self._plans: dict[tuple, tuple] = {}
        self._ready: set[tuple] = set()  # batch dtypes the kernel is compiled for

    def clear(self) -> None:
        for h in self.hists:
            h.clear()

    def add(self, batch: EventBatch) -> None:
        n = len(batch)
        if self._fused and n:
            kernel, axes = self._plan(batch)
            pix, tof = batch.pixel_id, batch.tof
            parts = min(self.threads, *(len(h.parts) for h in self._fused)) if n >= MIN_SPLIT else 1
            cuts = [n * j // parts for j in range(parts + 1)]
            insides = [np.zeros(len(self._fused), np.int64) for _ in range(parts)]
            args = [
                [*axes, *(a for h in self._fused for a in h._slot_args(h.parts[j]))] for j in range(parts)
            ]
            pending = [_helpers(parts - 1).submit(kernel, pix, tof, cuts[j], cuts[j + 1], insides[j], *args[j])
                       for j in range(1, parts)]  # fmt: skip
            kernel(pix, tof, cuts[0], cuts[1], insides[0], *args[0])
            for p in pending:
                p.result()
            inside = np.sum(insides, axis=0)
            for h, k in zip(self._fused, inside.tolist(), strict=True):
                h.out_of_range += n - k
        for h in self._windowed:
            inside = 0
            for ptime, start, stop in _group_pulses(batch, h._slice_ns):
                inside += self._fill_one(h, batch, start, stop, h._slice(ptime // h._slice_ns))
            h.out_of_range += n - inside

    def prepare(self, batch: EventBatch) -> None:
        """Compile the kernel for this batch's dtypes now (counting nothing): callers do it outside their lock."""
        key = (batch.tof_unit, batch.tof.dtype, batch.pixel_id.dtype)
        if self._fused and len(batch) and key not in self._ready:
            kernel, axes = self._plan(batch)
            args = [a for h in self._fused for a in h._slot_args(h.parts[0])]
            kernel(batch.pixel_id, batch.tof, 0, 0, np.zeros(len(self._fused), np.int64), *axes, *args)
            self._ready.add(key)

    def _plan(self, batch: EventBatch) -> tuple:
        """(kernel, per-axis edges) for this batch's TOF unit and dtype (cached)."""
        key = (batch.tof_unit, batch.tof.dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(self._fused, batch.tof_unit, batch.tof.dtype, lambda h: h.stage)
        return plan

    @staticmethod
    def _fill_one(h: Histogram, batch: EventBatch, start: int, stop: int, counts: np.ndarray) -> int:
        key = (batch.tof_unit, batch.tof.dtype)
        plan = h._window_plans.get(key)
        if plan is None:
            plan = h._window_plans[key] = _plan([h], batch.tof_unit, batch.tof.dtype, lambda h: "")
        kernel, axes = plan
        inside = np.zeros(1, np.int64)
        kernel(batch.pixel_id, batch.tof, start, stop, inside, *axes, *h._slot_args((counts,)))
        return int(inside[0])


def _plan(hists: list[Histogram], unit: str, dtype: np.dtype, stage) -> tuple:
    """The fused kernel of these histograms for TOFs of `unit` and `dtype`, and its axes' edges.

    Histograms with equal edges share one axis: each event's TOF bin is found once."""
    axes: list[np.ndarray] = []
    modes: list[int] = []
    index: dict[tuple, int] = {}
    slots = []
    for h in hists:
        axis = -1
        if h.spec.tof is not None:
            edges = np.ascontiguousarray(h.spec.tof.edges_in(unit), dtype=np.float64)
            mode = kernels.tof_mode(edges, h.spec.tof.scale, dtype)
            key = (edges.tobytes(), mode)
            if key not in index:
                index[key] = len(axes)
                axes.append(edges)
                modes.append(mode)
            axis = index[key]
        # measured: an image alone counts 8% faster in one loop; with anything else the two loops win (1.75x)
        two_loop = not (len(hists) == 1 and h.spec.kind == "image")
        wide = h.spec.kind == "roi" and h._roi_span >= 2**31
        slots.append(kernels.Slot(h.spec.kind, axis, stage(h), two_loop, wide))
    return kernels.fused(kernels.Layout(tuple(modes), tuple(slots))), axes


def warm_up(specs: list[HistogramSpec], threads: int = 1) -> None:
    """Compile the fused kernel of these specs for int32 events now (one-pixel copies: no big allocation)."""
    import dataclasses

    one = np.ones(1, np.int32)
    hists = []
    for spec in specs:
        tiny = dataclasses.replace(
            spec, shape=tuple(1 for _ in spec.shape),
            roi_pixels=np.array([spec.first_pixel]) if spec.kind == "roi" else spec.roi_pixels,
        )  # fmt: skip
        h = Histogram(tiny)
        h.stage = stage_of(spec)  # the layout of the real histograms, so the same kernel
        h.clear()
        hists.append(h)
    HistogramSet(hists, threads).add(EventBatch(one, one, np.zeros(1, np.int64), np.zeros(1, np.int64)))


def same_binning(a: HistogramSpec, b: HistogramSpec) -> bool:
    """Do two specs count the same events into the same cells (so counts carry over)?"""
    if (a.kind, a.first_pixel, a.shape, a.window) != (b.kind, b.first_pixel, b.shape, b.window):
        return False
    if (a.tof is None) != (b.tof is None):
        return False
    if a.tof is not None and (a.tof.unit != b.tof.unit or not np.array_equal(a.tof.edges, b.tof.edges)):
        return False
    if (a.roi_pixels is None) != (b.roi_pixels is None):
        return False
    return a.roi_pixels is None or np.array_equal(a.roi_pixels, b.roi_pixels)


def make(spec: HistogramSpec, threads: int = 1) -> Histogram:
    return Histogram(spec, threads)
