"""Returns the C heap's free memory to the operating system when the engine goes idle.

A burst of requests leaves freed activations, sampling buffers and request objects in glibc's heap
(and in the per-thread arenas of the server's many request threads); glibc keeps that memory mapped,
so the model server's RSS stayed at its peak after a 200-client soak. `malloc_trim(0)` gives the free
pages back. Elsewhere than glibc (macOS, musl) this does nothing."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    try:  # the process's own symbols, which include the C library's (no ldconfig lookup)
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Releases free heap memory; True where the C library could (glibc)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
