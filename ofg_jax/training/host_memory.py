"""Giving the host memory that compilation freed back to the operating system.

XLA allocates and frees several hundred MB on the host while it compiles a
training step; glibc keeps most of the freed pages resident, so that the
process holds them for the rest of the run, on top of what the step needs.
"""

import ctypes
import ctypes.util


def release_freed_memory() -> bool:
    """glibc's ``malloc_trim(0)``: returns the free pages of every heap to the OS.

    Nothing in use moves or changes. Returns False where the C library has no
    ``malloc_trim`` (macOS, musl): there the call does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True
