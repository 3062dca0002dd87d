"""glibc malloc settings for training and scoring: large buffers are reused, not re-faulted.

glibc serves an allocation above its mmap threshold (128 KiB at start, raised by frees to at
most 32 MiB) with a fresh ``mmap`` and unmaps it on free, and gives the top of its heap back to
the kernel once more than 128 KiB of it is free. A training step allocates buffers of the same
large sizes every step (a batch's gathered behaviour bags: ~13 MB for 2048 users of the
``aliccp`` preset; activations; sparse embedding gradients), so with those defaults every step
writes to freshly mapped pages and pays a page fault per 4 KiB. bench/allocator.py measures
whole training steps both ways (docs/config.md has the figures).

:func:`keep_large_buffers` raises both thresholds, so such buffers come from the heap and are
reused from step to step. Memory a process has freed then stays mapped (up to
``TRIM_THRESHOLD`` at the top of the heap) rather than being returned at once: the peak is
unchanged, the resident size after a peak can stay higher. It changes nothing when:

- the C library is not glibc (macOS, Windows, musl), or another allocator is preloaded;
- the user set glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or ``GLIBC_TUNABLES``): theirs win;
- ``ESMM_MALLOC=system`` is set (the opt-out).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # allocations below it come from the heap
FALLBACK_MMAP_THRESHOLD = 32 << 20  # older glibc refuses more (half its 64 MiB heap, 64-bit)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before giving it back
USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None


def skip_reason(environ: dict[str, str] | None = None) -> str | None:
    """Why :func:`keep_large_buffers` leaves malloc alone here, or None when it applies."""
    env = os.environ if environ is None else environ
    if env.get("ESMM_MALLOC", "").strip().lower() == "system":
        return "ESMM_MALLOC=system"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    knobs = [k for k in USER_KNOBS if env.get(k)]
    if knobs:
        return f"set by the environment ({', '.join(knobs)})"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in OTHER_ALLOCATORS):
        return f"another allocator is preloaded (LD_PRELOAD={preload})"
    return None


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls return the
    first outcome). Returns whether the settings are in force."""
    global _applied
    if _applied is not None:
        return _applied
    reason = skip_reason()
    if reason is not None:
        log.debug("malloc settings left alone: %s", reason)
        _applied = False
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
               or libc.mallopt(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD) == 1)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = mmap_ok and trim_ok
    log.debug("malloc: mmap threshold raised %s, trim threshold raised %s", mmap_ok, trim_ok)
    return _applied
