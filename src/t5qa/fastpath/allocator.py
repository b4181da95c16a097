"""An allocator setting for CPU training: glibc keeps freed tensor memory for the next step.

Written for: glibc on Linux (musl and other C libraries do not take these settings), for CPU training only: on a
GPU the activations live in CUDA's caching allocator and this setting would only hold host memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from typing import Any

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_kept_depth = 0  # nested keep_freed_memory blocks (a fit() inside another's callback)


def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not take these settings)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc serves large blocks from its heap and keeps what is freed for reuse.

    PyTorch's CPU allocator calls malloc/free for every tensor. glibc hands blocks over 32 MiB (and, until its
    adaptive threshold has grown, those over 128 KiB) to mmap, and returns them with munmap when freed; it also
    trims the heap's top beyond 64 MiB. So each training step maps and zero-fills much of the same memory again:
    about 88,000 page faults per t5-small step (bench/experiments/LEVERS.md). Without mmap and with a high trim
    threshold the heap keeps those pages and later steps reuse them (about 1,000 faults per step; a step with a
    new largest batch shape still grows the heap). Peak memory measured the same or lower; the difference is that
    the process keeps its peak until the block ends, when the free memory is handed back (malloc_trim).

    Yields whether the setting took effect (glibc on Linux only; elsewhere the block runs unchanged).
    """
    global _kept_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _kept_depth += 1
    try:
        yield True
    finally:
        _kept_depth -= 1
        if not _kept_depth:  # else an enclosing block still wants the memory kept
            # glibc's adaptive thresholds cannot be switched back on; set what they grow to on their own (mmap
            # above 32 MiB, trim above 64 MiB), so later work in this process gets no more page faults than usual.
            libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
            libc.malloc_trim(0)


def available() -> bool:
    """Whether this process's C library takes the setting (glibc on Linux)."""
    return _glibc() is not None
