"""Keep the memory PyTorch frees on the CPU for its next tensors instead of giving it back to the kernel.

glibc's malloc serves every request above its mmap threshold (128 KiB, rising to at most 32 MiB as large blocks
are freed) with a fresh mapping, unmapped again on free, and returns free memory at the top of its heap to the
kernel. Activation tensors on the CPU are larger than that, so every forward pass and every training step gets
them as new, zero-filled pages, one page fault each: hundreds of thousands per training step, where a process
that keeps its freed memory takes one and runs the step several times faster (``lesionkit benchmark`` measures
both; docs/speed.md has the figures).

``lesionkit``'s commands raise both thresholds once at start-up: the glibc counterpart of the jemalloc or TCMalloc
that PyTorch's CPU performance tuning guide recommends preloading, which cannot be swapped in from inside Python.
A user's own allocator setting wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Tensors up to 1 GiB come from the heap (B1's largest at batch 32, 240x320 is 236 MB), and up to 1 GiB of free
# heap stays with the process. The process's memory stays near its peak: what one step needed, the next reuses.
HELD = 1 << 30


def user_chose_allocator() -> bool:
    """Whether the environment already sets glibc's malloc thresholds or preloads another allocator."""
    return (any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or "malloc" in os.environ.get("LD_PRELOAD", ""))


def hold_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to ``HELD`` (see the module docstring), unless the user chose an
    allocator setting. Returns whether the setting took: False too where the C library is not glibc."""
    if user_chose_allocator() or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HELD)) and bool(mallopt(M_TRIM_THRESHOLD, HELD))
