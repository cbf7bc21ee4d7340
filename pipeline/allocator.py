"""Keep freed memory in the process instead of handing it back to the kernel after every batch.

glibc's malloc serves large blocks (activations, SAM's masks: tens of MB a batch) by ``mmap`` and
returns them on free, so every batch of a labelling actor faults its memory in again, page by page,
and the kernel zeroes each page: on this project's 2-core machine that was a fifth of an actor's CPU
time, system time, not model time. Raising the mmap and trim thresholds keeps those blocks in the
heap for the next batch. Measured with ten tiny labelers on 8-image batches, one thread: 1.8-2.0 s
a batch before, 1.4 s after (docs/benchmarks.md). The cost: up to the thresholds of freed memory
stays resident in each actor, which a labelling process that allocates the same sizes every batch
would take back a moment later anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (malloc.h)."""
KEEP_BYTES = 1 << 30
"""Blocks below 1 GiB come from the heap, and up to 1 GiB of freed heap stays mapped."""
TOP_PAD_BYTES = 1 << 28


def keep_freed_memory() -> bool:
    """Set the thresholds in this process; False (and nothing changed) where the C library is not
    glibc (macOS, musl): there malloc behaves otherwise, and only the speed-up is lost."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt here: malloc left as it is")
        return False
    settings = ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
