"""Compiled histogramming kernels (numba, nogil so a receiver thread runs alongside).

One pass per event batch for all histograms of a device: `fused(layout)` generates and
compiles a kernel for a device's histogram list, reading each event's pixel id and TOF once
and updating every histogram (TOF bins are computed once per distinct axis).

Counts are exact int64. Large histograms count into a uint32 staging array (half the bytes
of int64, so twice as much of it stays in cache) whose rare wrap-around is carried into an
int64 array at once: total = carry + staging, never a lost or wrapped count.

Bins are half-open [edges[b], edges[b+1]) for every bin, the last one included. Three ways
to find a TOF bin, chosen per axis and event dtype by `tof_mode`:
  FAST      one multiply; used only where `tof_mode` proved it exact for integer TOFs
  FAST0     FAST for an axis from 0: TOFs read as unsigned, so a negative one lands past the
            end and the vectorised loop needs neither the subtraction nor the test (below 0)
  LINEAR    one multiply corrected by comparing with the neighbouring edges (as numpy does)
  SEARCH    binary search (log and explicit edges)
A kernel adds to `inside[k]` how many events histogram k counted; callers derive out-of-range counts.

Where a loop without branches pays, the kernel has one that the compiler vectorises: the FAST
bins of TOF spectra alone (`prebin`), and the cells of large pixel_tof maps (an event outside
notes one of SPARE spare cells past the map's cells, never read back). TOF spectra alone also
ask for the TOFs of later chunks ahead (`prefetch`, see TOF_CHUNK).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

FAST, LINEAR, SEARCH, FAST0 = 0, 1, 2, 3


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring the cache line of array[index] into L1 (LLVM's llvm.prefetch: read,
    keep). A hint: it never faults and changes nothing. `index` must be in range."""
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def tof_mode(edges: np.ndarray, scale: str, dtype: np.dtype) -> int:
    """FAST if the plain multiply bins every integer TOF exactly as the edges do.

    For integer t, `t >= e` <=> `t >= ceil(e)`, so bin k holds the integers
    ceil(e_k) .. ceil(e_k+1) - 1. floor((t - lo) * s) is monotonic in t, so checking it at
    both ends of every bin proves it right for every integer in between.

    FAST0 where FAST holds, the axis starts at 0 and ends at or below 2**31: a negative TOF
    read as an unsigned 32-bit integer is then 2**31 or more, past the last edge (and for
    t >= 0, t - 0 is t: the same multiply as FAST's).
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
    if not ok:
        return LINEAR
    return FAST0 if lo == 0 and first[-1] <= 2**31 else FAST


def _binner(mode: int):
    """bin_of(t, edges, lo, s, n): the bin of t, or n (one past the last bin) when outside or NaN."""
    if mode in (FAST, FAST0):

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if x >= lo:  # clamped before the conversion, undefined for a float beyond int64 (1e300)
                b = np.int64(min((x - lo) * s, np.float64(n)))
                if b < n:
                    return b
            return n

    elif mode == LINEAR:

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if not (x >= lo):  # also rejects NaN
                return n
            b = np.int64(min((x - lo) * s, np.float64(n)))  # clamped first (see FAST)
            if x < edges[np.uint64(b)]:  # b >= 0 here: unsigned skips the wrap-around test
                b -= 1
            elif b < n and x >= edges[np.uint64(b + 1)]:
                b += 1
            return b if 0 <= b < n else n

    else:

        @numba.njit(inline="always")
        def bin_of(t, edges, lo, s, n):
            x = np.float64(t)
            if not (x >= lo):
                return n
            b = np.searchsorted(edges, x, side="right") - 1
            return b if b < n else n

    return bin_of


BINNERS = {mode: _binner(mode) for mode in (FAST, LINEAR, SEARCH, FAST0)}


@numba.njit(inline="always")
def prebin(tof, ch, n, out, lo, s, fn):
    """FAST bins of the n TOFs from tof[ch], in a loop of its own that the compiler vectorises:
    the same bin as FAST's `bin_of` (fn, one past the last bin, when outside). Bins are < 2**31."""
    t = tof[ch : ch + n]
    for j in range(n):
        x = np.float64(t[j])
        y = min((x - lo) * s, fn)
        out[j] = np.int32(y if x >= lo else fn)


@numba.njit(inline="always")
def prebin0(tof, ch, n, out, lo, s, fn):
    """`prebin` for a FAST0 axis: the TOF as an unsigned 32-bit integer, times s (see `tof_mode`)."""
    t = tof[ch : ch + n]
    for j in range(n):
        out[j] = np.int32(min(np.float64(np.uint32(t[j])) * s, fn))


def pad_cell(b):
    """The cell of bin b in a page-padded private copy of TOF counts (see `_padded`): 256 cells
    in the lower half of each 4 KiB page, so that no count ever shares an offset within a page
    with the chunk's bins, kept in an upper half."""
    return b + ((b >> 8) << 8)  # ((b >> 8) << 9) | (b & 255), in fewer steps (measured 3-4% faster)


pad_cell_jit = numba.njit(inline="always")(pad_cell)


@numba.njit(inline="always")
def prebin_padded(tof, ch, n, out, lo, s, fn):
    """`prebin`, writing each bin's `pad_cell`."""
    t = tof[ch : ch + n]
    for j in range(n):
        x = np.float64(t[j])
        y = min((x - lo) * s, fn)
        out[j] = pad_cell_jit(np.int32(y if x >= lo else fn))


@numba.njit(inline="always")
def prebin0_padded(tof, ch, n, out, lo, s, fn):
    """`prebin0`, writing each bin's `pad_cell`."""
    t = tof[ch : ch + n]
    for j in range(n):
        out[j] = pad_cell_jit(np.int32(min(np.float64(np.uint32(t[j])) * s, fn)))


@dataclass(frozen=True)
class Slot:
    """One histogram in a fused kernel: its kind, TOF axis (index into the axes), storage."""

    kind: str  # tof | image | pixel_tof | roi
    axis: int = -1  # index of its TOF axis, -1 for image
    stage: str = ""  # "": int64 counts (and a spare cell at the end); "uint8" etc.: staging + int64 carry
    two_loop: bool = True  # staged: note cells, scatter them in a second loop (False: count at once)
    wide: bool = False  # an ROI spanning 2**31 pixels or more: its pixel and bin do not fit one int64 note


@dataclass(frozen=True)
class Layout:
    """What a fused kernel is generated from: the TOF axes' modes and the histogram slots."""

    axes: tuple[int, ...]  # tof_mode of each distinct TOF axis
    slots: tuple[Slot, ...]

    def arguments(self) -> list[str]:
        """The kernel's array/scalar arguments after (pix, tof, start, stop, inside)."""
        names = [f"e{g}" for g in range(len(self.axes))]
        for k, s in enumerate(self.slots):
            if s.kind != "tof":
                names += [f"f{k}", f"n{k}", f"m{k}"] if s.kind == "roi" else [f"f{k}", f"n{k}"]
            names += [f"c{k}", f"x{k}"] if s.stage else [f"c{k}"]
        return names


def _bump(k: int, stage: str, c: str, ind: str) -> list[str]:
    """Lines that add one count to cell `c` of slot k (staged: carried into int64 on wrap-around)."""
    if not stage:
        return [f"{ind}c{k}[{c}] += 1"]
    wrap = int(np.iinfo(stage).max) + 1
    return [f"{ind}v = np.int64(c{k}[{c}]) + 1", f"{ind}if v == {wrap}:", f"{ind}    c{k}[{c}] = 0",
            f"{ind}    x{k}[{c}] += {wrap}", f"{ind}else:", f"{ind}    c{k}[{c}] = v"]  # fmt: skip


def U(index: str) -> str:
    """An index known to be in range, as unsigned: numba then skips its negative-index wrap-around
    (4 instructions per access in the hot loop)."""
    return f"np.uint64({index})"


SPARE = 64  # spare cells after the cells of a staged histogram (see `_source`)
CHUNK = 1024  # events per chunk: its pending cells (8 KiB per large histogram) stay in L1
# TOF spectra alone: smaller chunks, and the TOFs PREFETCH events ahead asked for at each chunk's
# start, so that the memory read of later chunks overlaps the counting of this one. Measured in
# alternated pairs against the memory-read floor on an Intel host: 0.92-0.95x, against 0.72-0.75x
# for 1024-event chunks with the same prefetch and 0.67-0.70x for 1024 without. On host C
# (2026-12-04): 128-event chunks of a size the compiler knows (full chunks, then the rest) 0.77x
# against 0.69x for 256 in a loop bounded at run time; 64: 0.65x; FAST0 then 0.80-0.84x
TOF_CHUNK, PREFETCH = 128, 1024


def _source(layout: Layout) -> str:
    """Python source of the fused kernel (compiled by numba).

    Events are taken in chunks. The first loop reads each event once, bins its TOF once per
    axis (bin nb = outside) and decides without branches (an ROI or a random pixel would
    mispredict): small histograms count at once, an event outside going to a spare cell at
    the end of the counts (no test in the loop; `inside` follows from that cell), an ROI
    adding 0 where the pixel is not in it; large (staged) histograms only note the cell. A
    tight second loop per large histogram then scatters the noted cells: with nothing else
    in the loop, the CPU keeps many more cache misses in flight (measured 3x for 10^7 cells)."""
    args = ", ".join(["pix", "tof", "start", "stop", "inside", *layout.arguments()])
    head, loop, scatter, tail = [], [], [], []
    # binary searches only when an event falls on a histogram's pixels; the multiply for every event
    lazy_axes = {g for g, mode in enumerate(layout.axes) if mode == SEARCH}
    lazy_axes -= {s.axis for s in layout.slots if s.kind == "tof"}
    pre = []  # per chunk, before the event loop
    scratch = []  # the chunk's bins (unpadded TOF spectra)
    # TOF spectra alone: the FAST bins of a chunk in a loop of their own (vectorised), then the
    # counting loop. Measured in alternated pairs: 1.5x for a 1000-bin tof; 4-9% slower beside an
    # image, ROI or pixel_tof, whose loop then reads the bin back instead of computing it
    prebinned = all(s.kind == "tof" for s in layout.slots)
    # large pixel_tof maps: their cells noted in a loop without branches or compaction, which
    # the compiler vectorises (an event outside notes one of SPARE spare cells, in turn, so no
    # chain of adds forms on one cell). Measured in alternated pairs: 1.5x for pixel_tof; for a
    # large image 0.8x beside a tof (its notes are too cheap to gain, the extra loop costs)
    vec = {k for k, s in enumerate(layout.slots)
           if s.stage and s.two_loop and s.kind == "pixel_tof" and s.axis not in lazy_axes}  # fmt: skip
    vec_axes = {layout.slots[k].axis for k in vec}
    scalar_axes = {s.axis for k, s in enumerate(layout.slots) if k not in vec and s.axis >= 0}
    vloop, vscatter = [], []
    if vec:
        vloop.append("p = np.int64(pc[j])")
    for g, mode in enumerate(layout.axes):
        head += [f"nb{g} = e{g}.size - 1", f"lo{g} = e{g}[0]", f"s{g} = nb{g} / (e{g}[nb{g}] - lo{g})"]
        if g in vec_axes:
            if mode in (FAST, FAST0):  # prebin's formula, inline
                head.append(f"fn{g} = np.float64(nb{g})")
                vloop += ["x = np.float64(tc[j])", f"y = min((x - lo{g}) * s{g}, fn{g})",
                          f"b{g} = np.int64(np.int32(y if x >= lo{g} else fn{g}))"]  # fmt: skip
            else:
                vloop.append(f"b{g} = bin{g}(tc[j], e{g}, lo{g}, s{g}, nb{g})")
            if g in scalar_axes:
                head.append(f"t{g} = np.empty({CHUNK}, np.int64)")
                vloop.append(f"t{g}[j] = b{g}")
                loop.append(f"b{g} = t{g}[np.uint64(i - ch)]")
        elif g in lazy_axes:
            loop.append(f"b{g} = -1")
        elif mode in (FAST, FAST0) and prebinned:
            head.append(f"fn{g} = np.float64(nb{g})")
            scratch.append(f"t{g} = np.empty({TOF_CHUNK}, np.int32)")
            if not pre:  # one line of 16 int32 TOFs per prefetch (a hint: it never faults)
                pre.append(f"for k in range(ch + {PREFETCH}, min(ch + {PREFETCH + TOF_CHUNK}, stop), 16):")
                pre.append("    prefetch(tof, k)")
            pre.append(
                f"{'prebin0' if mode == FAST0 else 'prebin'}(tof, ch, hi - ch, t{g}, lo{g}, s{g}, fn{g})"
            )
            loop.append(f"b{g} = np.int64(t{g}[np.uint64(j)])")
        else:
            loop.append(f"b{g} = bin{g}(tof[u], e{g}, lo{g}, s{g}, nb{g})")
    head += [f"w{k} = np.empty({CHUNK}, np.int64)" for k, s in enumerate(layout.slots) if s.stage]
    if any(s.kind != "tof" for k, s in enumerate(layout.slots) if k not in vec):
        loop.insert(0, "p = np.int64(pix[u])")
    for k, s in enumerate(layout.slots):
        g = s.axis
        spare = f"c{k}.size - 1"  # the spare cell of direct counts
        if k in vec:
            ok = f"{U('q')} < {U(f'n{k}')} and {U(f'b{g}')} < {U(f'nb{g}')}"
            cell = f"q * nb{g} + b{g}"
            vloop += [f"q = p - f{k}", f"ok = {ok}", f"w{k}[j] = {cell} if ok else sp{k} + (j & {SPARE - 1})",
                      f"in{k} += ok"]  # fmt: skip
            vscatter += [
                "for j in range(hi - ch):",
                f"    r = {U(f'w{k}[j]')}",
                *_bump(k, s.stage, "r", "    "),
            ]
            head += [f"sp{k} = c{k}.size - {SPARE}", f"in{k} = 0"]
            tail.append(f"inside[{k}] += in{k}")
            continue
        if s.kind == "tof":
            ok, cell = None, U(f"b{g}")  # bin nb is the spare cell
        elif s.kind == "roi" and not s.stage:  # note the events in the ROI's span; test the mask after
            j = U("j")
            # a note of the pixel and one of the bin (lazy axis: the event's index, to bin it later)
            if g in lazy_axes or s.wide:
                loop += [f"q = p - f{k}", f"wq{k}[{U(f'k{k}')}] = q",
                         f"wb{k}[{U(f'k{k}')}] = {'i' if g in lazy_axes else f'b{g}'}"]  # fmt: skip
                scatter += [f"for j in range(k{k}):", f"    qq = wq{k}[{j}]",
                            f"    b = bin{g}(tof[{U(f'wb{k}[{j}]')}], e{g}, lo{g}, s{g}, nb{g})" if g in lazy_axes
                            else f"    b = wb{k}[{j}]"]  # fmt: skip
                head += [f"wb{k} = np.empty({CHUNK}, np.int64)"]
            else:  # pixel and bin in one note (both < 2**31 where kept): one store per event, 3-5% faster
                loop += [f"q = p - f{k}", f"wq{k}[{U(f'k{k}')}] = (q << 32) | b{g}"]
                scatter += [f"for j in range(k{k}):", f"    qb = wq{k}[{j}]", "    qq = qb >> 32",
                            "    b = qb & 0xFFFFFFFF"]  # fmt: skip
            loop += [f"k{k} += {U('q')} < {U(f'n{k}')}"]
            scatter += [f"    ok = (((m{k}[{U('qq >> 3')}] >> (qq & 7)) & 1) == 1) & ({U('b')} < {U(f'nb{g}')})",
                        f"    c{k}[{U('b')}] += ok", f"    in{k} += ok"]  # fmt: skip
            head += [f"wq{k} = np.empty({CHUNK}, np.int64)", f"in{k} = 0"]
            tail.append(f"inside[{k}] += in{k}")
            continue
        else:
            loop += [f"q = p - f{k}", f"ok = {U('q')} < {U(f'n{k}')}"]
            if s.kind == "roi":  # one bit per pixel of the ROI's span: 25 KiB for 200x200 of 1000 wide
                loop += ["qq = q if ok else 0", f"ok = ok & (((m{k}[{U('qq >> 3')}] >> (qq & 7)) & 1) == 1)"]
            if s.kind != "image":
                if g in lazy_axes:
                    loop += [f"if ok and b{g} == -1:", f"    b{g} = bin{g}(tof[u], e{g}, lo{g}, s{g}, nb{g})"]
                loop += [f"ok = ok & ({U(f'b{g}')} < {U(f'nb{g}')})"]
            ok = "ok"
            roi_bin = f"max(b{g}, 0)" if g in lazy_axes else U(f"b{g}")  # b = -1: not binned
            cell = {"image": "q", "roi": roi_bin, "pixel_tof": f"q * nb{g} + b{g}"}[s.kind]
        if s.stage and not s.two_loop:
            loop += [
                f"if {ok or f'b{g} < nb{g}'}:",
                f"    r = {U(cell)}",
                *_bump(k, s.stage, "r", "    "),
                f"    in{k} += 1",
            ]
            head.append(f"in{k} = 0")
            tail.append(f"inside[{k}] += in{k}")
        elif s.stage:  # note the cell (kept only if ok), scatter after the chunk
            loop += [f"w{k}[{U(f'k{k}')}] = {cell}", f"k{k} += {ok or f'b{g} < nb{g}'}"]
            scatter += [f"for j in range(k{k}):", f"    r = {U(f'w{k}[j]')}", *_bump(k, s.stage, "r", "    "),
                        f"in{k} += k{k}"]  # fmt: skip
            head.append(f"in{k} = 0")
            tail.append(f"inside[{k}] += in{k}")
        elif (
            s.kind == "roi"
        ):  # += 0 where not in the ROI, at a bin that varies (a fixed cell would chain the adds)
            loop += [f"c{k}[{cell}] += ok", f"in{k} += ok"]
            head.append(f"in{k} = 0")
            tail.append(f"inside[{k}] += in{k}")
        else:  # outside: the spare cell
            loop += [f"c{k}[{cell if ok is None else U(f'{cell} if ok else {spare}')}] += 1"]
            head.append(f"c{k}[{spare}] = 0")
            tail += [f"inside[{k}] += stop - start - c{k}[{spare}]", f"c{k}[{spare}] = 0"]
    chunk = [f"k{k} = 0" for k, s in enumerate(layout.slots) if (s.stage or s.kind == "roi") and k not in vec]
    chunk += pre
    if vec:
        chunk += ["pc = pix[ch:hi]", "tc = tof[ch:hi]", "for j in range(hi - ch):"] + [
            "    " + x for x in vloop
        ]
    if prebinned:  # counted from the chunk's bins: j from 0 (u, the event's index, for lazy axes)
        chunk += ["for j in range(hi - ch):", "    u = np.uint64(ch + j)"] + ["    " + x for x in loop]
    elif len(vec) < len(layout.slots):
        chunk += ["for i in range(ch, hi):", "    u = np.uint64(i)"] + ["    " + x for x in loop]
    chunk += scatter + vscatter
    body = ["    " + x for x in head]
    if (
        prebinned
    ):  # full chunks of a size the compiler knows (it unrolls the loops, no remainders), then the rest
        plain = [*scratch, *_chunks(chunk)]
        if all(not s.stage for s in layout.slots):
            body += ["    " + x for x in _padded(layout, pre, loop, plain)]
        else:
            body += ["    " + x for x in plain]
    else:
        body += [f"    for ch in range(start, stop, {CHUNK}):", f"        hi = min(ch + {CHUNK}, stop)"]
        body += ["        " + x for x in chunk]
    body += ["    " + x for x in tail]
    return f"def fill({args}):\n" + "\n".join(body) + "\n"


def _chunks(chunk: list[str]) -> list[str]:
    """Full chunks of a size the compiler knows (it unrolls the loops, no remainders), then the rest."""
    return [f"full = start + (stop - start) // {TOF_CHUNK} * {TOF_CHUNK}",
            f"for ch in range(start, full, {TOF_CHUNK}):", f"    hi = ch + {TOF_CHUNK}",
            *["    " + x for x in chunk], "if full < stop:", "    ch = full", "    hi = stop",
            *["    " + x for x in chunk]]  # fmt: skip


# TOF spectra alone, of PAD_CELLS padded cells or fewer in all, count into a private copy of
# their counts, page-padded (`pad_cell`), folded into the counts at the end of the call. A CPU
# checks a load against the stores before it by their offset within a 4 KiB page and, it
# seems, a hash of their physical pages: when the page of the chunk's bins and a page of the
# counts collide (about 1 pair of pages in 16, fixed for the life of the allocations), each
# read of a bin that shares an offset with a recent count waits. Measured on host C: such
# processes ran the spectrum 3-6x slower, whatever the placement within the page; in the
# padded copy the bins sit in the upper half of a page and counts only in lower halves, so
# no offset is ever shared (14 processes: 0.76-0.81x the memory-read floor, against 0.20-0.82x).
PAD_CELLS = 8192  # 64 KiB: an allocation malloc serves from its heap, zeroed and folded per call
# and only for calls of at least a quarter as many events as padded cells: a smaller call (a
# pulse group of a windowed spectrum, a tiny message, the 0-event calls that compile) would
# pay more for the copy than the counting; it counts in place


def _padded(layout: Layout, pre: list[str], loop: list[str], plain: list[str]) -> list[str]:
    """The body of a TOF-spectra-only kernel: counting into a padded private copy of the
    counts when they are small (`PAD_CELLS`), else `plain` (counting in place)."""
    slots = layout.slots
    # each axis takes the upper half of a page of its own: every axis has a slot, so a page
    if {s.axis for s in slots} != set(range(len(layout.axes))):
        raise ValueError(f"a layout whose every TOF axis has a spectrum, not {layout}")
    sizes = [f"(((nb{s.axis} >> 8) + 1) << 9)" for s in slots]
    out = [f"cells = {' + '.join(sizes)}", f"if cells <= {PAD_CELLS} and (stop - start) * 4 >= cells:",
           "    buf = np.empty(cells + 512, np.int64)",
           "    o = ((4096 - buf.ctypes.data % 4096) % 4096) // 8",  # the first page boundary
           "    pad = buf[o : o + cells]", "    pad[:] = 0", "    a = 0"]  # fmt: skip
    for k, size in enumerate(sizes):
        out += [f"    p{k} = pad[a : a + {size}]", f"    a += {size}"]
    # every slot has a page at least, so axis g takes the upper half of page g
    out += [f"    r{g} = pad[{g * 512 + 256} : {g * 512 + 256 + TOF_CHUNK // 2}].view(np.int32)"
            for g in range(len(layout.axes))]  # fmt: skip
    chunk_pre = [x.replace("prebin0(", "prebin0_padded(").replace("prebin(", "prebin_padded(")
                 for x in pre]  # fmt: skip
    chunk_pre = [re.sub(r", t(\d+), ", r", r\1, ", x) for x in chunk_pre]
    chunk_loop = []
    for x in loop:
        m = re.fullmatch(r"b(\d+) = np\.int64\(t\d+\[(.*)\]\)", x)
        if m:
            chunk_loop.append(f"b{m[1]} = np.int64(r{m[1]}[{m[2]}])")
            continue
        m = re.fullmatch(r"b(\d+) = (bin\d+\(.*\))", x)
        if m:  # an axis binned event by event: its padded cell
            chunk_loop.append(f"b{m[1]} = pad_cell({m[2]})")
            continue
        m = re.fullmatch(r"c(\d+)\[(.*)\] \+= 1", x)
        assert m, x
        chunk_loop.append(f"p{m[1]}[{m[2]}] += 1")
    chunk = [
        *chunk_pre,
        "for j in range(hi - ch):",
        "    u = np.uint64(ch + j)",
        *["    " + x for x in chunk_loop],
    ]
    out += ["    " + x for x in _chunks(chunk)]
    for k, s in enumerate(slots):  # the fold, the spare cell (events outside) included
        out += [f"    for b in range(nb{s.axis} + 1):", f"        c{k}[b] += p{k}[pad_cell(b)]"]
    out += ["else:", *["    " + x for x in plain]]
    return out


_compiled: dict[Layout, object] = {}
_compile_lock = threading.Lock()


def _cache_dir() -> Path | None:
    """Where generated kernels are kept as modules, so numba's on-disk cache spares a new
    process the compile (about 1 s, several on a loaded machine); None if not writable."""
    root = os.environ.get("LIVEHIST_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "livehist", "kernels"
    )
    try:
        os.makedirs(root, exist_ok=True)
        return Path(root) if os.access(root, os.W_OK) else None
    except OSError:
        return None


# generated modules are named by this file's source too: a changed binner never meets an old cache
_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _module_source(layout: Layout, cache: bool = True) -> str:
    binners = "".join(f"bin{g} = BINNERS[{mode}]\n" for g, mode in enumerate(layout.axes))
    return (
        f"# generated by livehist.engine.kernels for {layout}\n"
        "import numba\nimport numpy as np\n\nfrom livehist.engine.kernels import BINNERS, pad_cell_jit as pad_cell, prebin, prebin0, prebin0_padded, prebin_padded, prefetch\n\n"
        f"{binners}\n\n@numba.njit(nogil=True{', cache=True' if cache else ''})\n{_source(layout)}"
    )


def _load(layout: Layout):
    source = _module_source(layout)
    folder = _cache_dir()
    if folder is not None:
        name = "fused_" + hashlib.sha256((_VERSION + source).encode()).hexdigest()[:20]
        path = folder / f"{name}.py"
        try:
            if not path.exists():
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(source)
                os.replace(tmp, path)  # atomic: another process may be writing the same module
            spec = importlib.util.spec_from_file_location(f"livehist_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # numba's cache finds the function's module by name
            spec.loader.exec_module(module)
            return module.fill
        except (OSError, SyntaxError, ImportError):
            pass  # no usable cache: compile in memory
    namespace: dict = {}
    exec(compile(_module_source(layout, cache=False), f"<livehist fused kernel {layout}>", "exec"), namespace)
    return namespace["fill"]


def fused(layout: Layout):
    """The compiled kernel of a layout (generated once per layout, compiled once per dtype)."""
    kernel = _compiled.get(layout)
    if kernel is None:
        with _compile_lock:
            kernel = _compiled.get(layout)
            if kernel is None:
                kernel = _compiled[layout] = _load(layout)
    return kernel


@numba.njit(nogil=True, cache=True)
def block_sum(image, f, out):
    """out[r, c] = sum of image[r*f:(r+1)*f, c*f:(c+1)*f], without the GIL: the f rows of a
    block row are added into one row first (contiguous, vectorised), then its f-wide column
    blocks (2.5x faster than summing each block in turn: 0.36 against 0.9 ms for 10^6 pixels)."""
    ny, nx = out.shape
    width = nx * f
    acc = np.empty(width, np.int64)
    for r in range(ny):
        src = image[r * f]
        for x in range(width):
            acc[x] = np.int64(src[x])
        for k in range(1, f):
            src = image[r * f + k]
            for x in range(width):
                acc[x] += np.int64(src[x])
        row = out[r]
        if f == 2:  # the usual preview of a 10^6-pixel image
            for c in range(nx):
                row[c] = acc[2 * c] + acc[2 * c + 1]
        else:
            for c in range(nx):
                total = np.int64(0)
                for x in range(c * f, c * f + f):
                    total += acc[x]
                row[c] = total


@numba.njit(nogil=True, cache=True)
def narrow_i32(src, dst):
    """dst[i] = src[i] as int32, for int64 counts; True when every value fits (0 <= v < 2**31),
    else False and dst holds nothing of use. One pass, no GIL."""
    high = np.int64(0)
    for i in range(src.size):
        v = src[i]
        high |= v >> 31  # 0 only for 0 <= v < 2**31; negative values set every bit
        dst[i] = np.int32(v & 0x7FFFFFFF)
    return high == 0
