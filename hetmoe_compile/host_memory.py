"""Hand freed host memory back to the operating system.

glibc keeps large freed blocks in its heap once its adaptive mmap threshold has risen (it does after the first
big temporary is freed), so the resident set of a process that programs hardware instances chunk by chunk stays
at its high-water mark. :func:`trim` asks the allocator to return those pages (``malloc_trim``); elsewhere (no glibc)
it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def trim() -> bool:
    """Return free heap pages to the OS; True if the allocator supports it."""
    fn = _malloc_trim()
    if fn is None:  # pragma: no cover - not glibc
        return False
    fn(0)
    return True
