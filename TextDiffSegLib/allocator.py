"""Freed tensors' memory kept for the next ones, where the C library is glibc (Linux).

glibc's malloc maps each allocation above 32 MB (a CPU tensor of a batch of slices' features) as fresh pages
from the kernel, and unmaps them when it is freed; the next tensor of that size page-faults every page in again.
Sampling allocates and frees such tensors at every step, and on a 2-core CPU those page faults took more than
half of an LCPDN organ's time (``benchmarks/freed_memory.py``). ``keep_freed_memory`` has malloc serve every
allocation from its heap and keep what is freed there, up to 2 GB unused; ``release_freed_memory`` gives the
unused memory back to the system, which the Slicer worker does after each request. Where the C library is
another (macOS, Windows, musl), both do nothing and return False.
"""

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameters, from glibc's malloc.h
M_MMAP_MAX = -4
KEPT_BYTES = 2**31 - 1  # the most unused memory kept at the heap's top (mallopt takes an int)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def keep_freed_memory() -> bool:
    """Serve large allocations from malloc's heap and keep freed memory for the next; True where this was done."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))


def release_freed_memory() -> bool:
    """Give the memory freed and kept back to the system; True where some was given back."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
