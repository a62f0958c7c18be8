"""The host process's memory allocator, tuned for training and sampling on CPU.

A training step frees most of what it allocated (activations, gradients, temporaries) and allocates the
same sizes again in the next step. glibc's malloc returns large free memory to the kernel: free space at
the top of the heap beyond its trim threshold (by default twice the largest block it has ``mmap``-ed, at
most 64 MiB) is trimmed after every step. The next step then touches fresh pages, and the kernel serves
each first touch of a 4 KiB page with a page fault that zeroes it: 115,000-184,000 faults a step at the
46 M bench size, 9,409 at the demo size, where the step ran 16.70 img/s against 21.63 with
:func:`keep_freed_memory`, which makes malloc keep what it frees for the next step instead
(docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap: the largest glibc allows on 64-bit. Larger ones stay mmap-ed
# (faulted in on every allocation): served from the heap, a block allocated again while a small one that
# came after it lives on finds no hole it fits, and the heap grew by 8x a 128 MiB block before it did.
HEAP_BLOCK_BYTES = 32 * 2 ** 20
# the largest value mallopt takes (an int): free memory at the heap's top beyond this is still returned
KEEP_BYTES = 2 ** 31 - 1
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES")


def user_chose_allocator(environ: dict) -> bool:
    """Whether ``environ`` already sets malloc up: glibc's own variables or tunables, or another allocator
    (jemalloc, tcmalloc, mimalloc) preloaded. textdiff then leaves the allocator as the user set it."""
    preload = environ.get("LD_PRELOAD", "")
    return any(k in environ for k in USER_SETTINGS) or any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory(environ: dict | None = None) -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (blocks up to 32 MiB from the heap,
    and up to 2 GiB of free heap kept rather than trimmed); returns whether it did. A no-op (False) without
    glibc, or where the user chose the allocator's settings (:func:`user_chose_allocator`). The process's
    peak resident memory stays what the largest step needs: what a step frees, the next one reuses."""
    if user_chose_allocator(os.environ if environ is None else environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters differ elsewhere
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
