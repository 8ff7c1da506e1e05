"""The process's C heap policy for IREE's runtime (glibc ``mallopt``), in a module of its own so
that the CLI can set it before anything imports torch, onnxruntime or IREE."""

from __future__ import annotations

import ctypes

#: glibc returns a freed block above its mmap threshold (at most 32 MB) to the kernel, so every
#: call of a vmfb faulted its large transient buffers in again: SECOND took ~84k minor page faults
#: a call, and a one-op gather writing 85 MB spent 42 of its 58 ms in the kernel (15.8 ms with the
#: memory kept). onnxruntime keeps its buffers in an arena. ``retain_freed_memory`` gives IREE the
#: same; these are the same settings for IREE's command-line tools (docs/iree.md, "Reproducing").
#: IREE's worker threads allocate from glibc's per-thread arenas, which map any block over 64 MB
#: afresh whatever the mmap settings say: CenterPoint voxel still took ~290k faults a call (0.5 s
#: of kernel time on one thread) until every thread shared the main heap (``MALLOC_ARENA_MAX=1``).
_TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before glibc trims it
RETAIN_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD), "MALLOC_ARENA_MAX": "1"}


# glibc's <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt(param, value)``; False where the C library has none or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(param, value))


def one_malloc_arena() -> bool:
    """Make threads that have not allocated yet take glibc's main heap (``M_ARENA_MAX`` 1) instead
    of arenas of their own; call it before any thread pool starts (the CLI does, first thing). On
    its own it changes no reuse policy: ``retain_freed_memory`` keeps the freed blocks. False
    where the C library has no mallopt."""
    return _mallopt(_M_ARENA_MAX, 1)


def retain_freed_memory() -> bool:
    """Keep freed heap memory in this process (glibc ``mallopt``: no mmap'd blocks, trim only above
    2 GiB free, one arena for the threads that start from now on), so a vmfb's transient buffers
    are reused instead of faulted in on every call. Affects later allocations of the whole process;
    False where the C library has no mallopt."""
    return one_malloc_arena() and _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
