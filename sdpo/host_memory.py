"""Host memory on a CPU: keep what a training step frees, so that the next step reuses it.

A training step on a CPU allocates and frees the same large buffers every step: each weight
gradient (up to 112 MiB for SD1.5's largest convolution, 3.4 GB in all, once per micro-batch),
the optimizer's temporaries and the activations. By default glibc gives blocks of 32 MiB and more
their own mappings and unmaps them when freed, and trims the top of its heap when enough of it is
free; the next step then faults the same memory in again, page by page, zeroed by the kernel. On
SD1.5 at 256 px that was about a third of a step, in our code and in the reference's alike (the
README's performance section). How much glibc hands back depends on the order of allocations (its
thresholds move with what was freed last), so two codes doing the same arithmetic can differ by
seconds per step: under a fixed allocator policy, ours and the reference's took the same time and
page faults per step.

`keep_freed_memory` tells glibc to serve the blocks from its heap and never to trim it: the heap
grows to the step's peak once and is reused from then on (measured on SD1.5 at 256 px: no page
faults within a step, the same peak memory). This holds for the main thread's heap, where the
training step allocates (autograd's CPU backward runs on the calling thread); other threads' heaps
still map blocks of over 64 MiB on their own and unmap a heap that is wholly free. Dataloader
workers forked afterwards inherit the setting (each keeps its own peak). The arithmetic is
unchanged: PyTorch aligns every CPU buffer to 64 bytes whichever way the memory comes. The process
keeps its peak memory until it exits, which a training process reaches again every step anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_info() -> dict[str, int]:
    """glibc's view of this process's memory (mallinfo2, glibc 2.33 and newer): the main heap's
    bytes, and the blocks mapped on their own (count and bytes)."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"heap": info.arena, "mapped_chunks": info.hblks, "mapped_bytes": info.hblkhd}


def keep_freed_memory() -> bool:
    """Serve large blocks from glibc's heap too and never trim it (the process keeps what it freed
    for reuse). Returns whether it applied: False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt(3): an M_MMAP_MAX of 0 serves large blocks from the heap too; an M_TRIM_THRESHOLD of
    # -1 disables trimming completely. (musl's mallopt does nothing and returns 0.)
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    if applied:
        logger.info("host memory: freed buffers stay in the process for the next step (glibc: large blocks from "
                    "the heap, no trimming; --host_memory release for glibc's default)")
    return applied
