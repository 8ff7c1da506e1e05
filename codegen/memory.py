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


def _mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def one_malloc_arena() -> bool:
    """Make threads that have not allocated yet take glibc's main heap (``M_ARENA_MAX`` 1) instead
    of arenas of their own; call it before any thread pool starts (the CLI does, first thing). On
    its own it changes no reuse policy: ``retain_freed_memory`` keeps the freed blocks. False
    where the C library has no mallopt."""
    mallopt = _mallopt()
    m_arena_max = -8  # glibc's <malloc.h>
    return mallopt is not None and bool(mallopt(m_arena_max, 1))


def retain_freed_memory() -> bool:
    """Keep freed heap memory in this process (glibc ``mallopt``: no mmap'd blocks, trim only above
    2 GiB free, one arena for the threads that start from now on), so a vmfb's transient buffers
    are reused instead of faulted in on every call. Affects later allocations of the whole process;
    False where the C library has no mallopt."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return one_malloc_arena() and bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, _TRIM_THRESHOLD))
