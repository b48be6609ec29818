"""Keep the process's resident memory close to its live tensors (glibc).

glibc serves large blocks from its heap once its adaptive mmap threshold has risen (it does after the first big
temporary is freed), and a heap of freed, fragmented blocks does not shrink: programming hardware instances chunk
by chunk then peaks at twice its live temporaries and stays there. Within :func:`bounded_allocator` the threshold
is 1 MiB (``mallopt(M_MMAP_THRESHOLD)``), so every tensor of a megabyte or more is its own mapping, returned to the
system when freed; after it the threshold is 32 MiB, the ceiling glibc's adaptive threshold reaches anyway, so the
forward passes that follow allocate from the heap as fast as before. The bound has a price: every temporary is
fresh, zero-filled pages, so programming on the CPU takes about 1.8x as long (``benchmarks/RESULTS.md``);
``HETMOE_BOUNDED_ALLOCATOR=0`` trades the memory back for that time. :func:`trim` returns the free pages still in
the heap (``malloc_trim``). Both are process-wide and do nothing where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator

BOUND_ENV = "HETMOE_BOUNDED_ALLOCATOR"
_M_MMAP_THRESHOLD = -3
BOUNDED_THRESHOLD = 1 << 20
DEFAULT_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - no C library to load
        return None


@contextlib.contextmanager
def bounded_allocator() -> Iterator[None]:
    """A block whose large temporaries go back to the system as soon as they are freed (see the module)."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is None or os.environ.get(BOUND_ENV, "1").strip() == "0":
        yield
        return
    fn(_M_MMAP_THRESHOLD, BOUNDED_THRESHOLD)
    try:
        yield
    finally:
        fn(_M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        trim()


def trim() -> bool:
    """Return free heap pages to the OS; True if the allocator supports it."""
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is None:  # pragma: no cover - not glibc
        return False
    fn(0)
    return True
