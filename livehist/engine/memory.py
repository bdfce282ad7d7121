"""Keep freed message buffers in the process, so receiving is not paying the kernel to zero pages.

A network source receives messages of megabytes (a 10^6-event ev44 is 8 MB), allocated by
the transport's I/O thread and freed by the engine after histogramming. glibc's malloc gives
memory at the top of a heap back to the kernel once more than M_TRIM_THRESHOLD is free there
(32 MiB at most by default, lower before its first large free), and serves allocations over
M_MMAP_THRESHOLD with fresh mmaps. While the engine queue fills and drains, freed buffers
were given back and taken again: every page of the next message then faulted and was zeroed
by the kernel, in the receive thread (measured: 100-170 page faults per 8 MB message, and
up to 40% of the receive thread's CPU in `clear_page`).

`retain_freed_memory()` raises both thresholds and the top pad (which also decides whether
an I/O thread's heap whose chunks are all free is unmapped), once per process: freed buffers
stay for the next message. The process then keeps its high-water mark of message memory (bounded by the
engine queue's MaxQueueBytes plus the transport's few in-flight messages) instead of
returning it. LIVEHIST_RETAIN_MEMORY=0 leaves malloc as it is. Other C libraries: nothing done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger("livehist.engine.memory")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit); larger messages are mmapped
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # also what a thread's heap keeps when all its chunks are free (else it is unmapped)

_done: bool | None = None
_lock = threading.Lock()


def retain_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds (once per process); True if they are raised."""
    global _done
    with _lock:
        if _done is None:
            _done = False
            if os.environ.get("LIVEHIST_RETAIN_MEMORY", "1").strip() not in ("0", "no", "false"):
                try:
                    mallopt = ctypes.CDLL(None).mallopt
                except (OSError, AttributeError):  # not glibc
                    return False
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                settings = (
                    (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                    (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                    (M_TOP_PAD, TOP_PAD),
                )
                _done = all([mallopt(option, value) == 1 for option, value in settings])
                log.debug("malloc thresholds raised: %s", _done)
        return _done
