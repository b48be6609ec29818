"""Ctrl-C that a library turns into another error (torch.export's cleanup raising "Trying to pop empty mode
stack" over the KeyboardInterrupt, say) is still reported as an interruption, not as the error it became."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_seen = False


def _on_sigint(signum, frame) -> None:
    global _seen
    _seen = True
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


@contextmanager
def watching_interrupts() -> Iterator[None]:
    """Note every SIGINT while the block runs (when Python's default handler is the one installed and this is the
    main thread; an ignored or custom SIGINT is left alone)."""
    global _seen
    _seen = False
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, comes from, or was raised after a Ctrl-C: a KeyboardInterrupt in its cause/context chain,
    or a SIGINT seen inside :func:`watching_interrupts`."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return _seen
