"""Process memory helpers for the streaming converters and the checkpoint writer."""

from __future__ import annotations

_libc = None  # ctypes handle of glibc once loaded, False where unavailable


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere), so that a
    streaming conversion's resident memory follows what it holds, not its past peaks."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
