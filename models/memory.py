"""A process-wide CPU allocator setting that makes guided sampling on the CPU about 20% faster.

glibc's malloc hands every freed block over 32 MiB straight back to the kernel, so each large UNet
activation is a fresh ``mmap`` whose pages the kernel faults in and zeroes again on every step (millions
of page faults per 256x256 forward+backward). Keeping freed memory in the process avoids that:
``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD = -1`` (the heap is never
trimmed). The cost: the process keeps its peak memory instead of returning it.

Measured with ``tests/benchmark.py --keep-freed-memory`` (README, Performance). The command line turns it
on for the whole process on CPU runs (``keep_freed_memory``); the engine's ``edit`` turns it on only while
it samples on the CPU and then restores the setting (large blocks mmapped and handed back again) and asks
glibc to trim the heap (``keeping_freed_memory``), so inside ComfyUI the host does not hold its sampling
peak between prompts (best effort: glibc can only return the heap's free top and whole free pages). Either is skipped when the user set ``MALLOC_MMAP_MAX_`` /
``MALLOC_TRIM_THRESHOLD_`` (their choice wins) or ``BLENDED_DIFFUSION_KEEP_FREED_MEMORY=0``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4   # glibc <malloc.h>
# Any mallopt call ends glibc's dynamic mmap threshold, so "off" restores the state that dynamic scheme
# reaches once a process has freed large blocks (as every sampling run has): mmap above 32 MiB (its
# ceiling on 64-bit), trim above twice that, the default mmap count.
RESTORE_MMAP_THRESHOLD, RESTORE_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 32 * 2**20, 64 * 2**20, 65536
KEEP_TRIM_THRESHOLD = -1  # mallopt(3): "-1 disables trimming completely"
_on = False  # set for the whole process by keep_freed_memory(True)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both or neither)
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to set
        return None


def available() -> bool:
    return _libc() is not None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in the process (True) or give it back to the kernel again (False: large blocks
    mmapped, the heap trimmed; see RESTORE_*). Returns whether the setting was applied; False where the C
    library has no ``mallopt``."""
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    global _on
    if enabled:
        ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    else:
        ok = (bool(mallopt(M_MMAP_THRESHOLD, RESTORE_MMAP_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX))
              and bool(mallopt(M_TRIM_THRESHOLD, RESTORE_TRIM_THRESHOLD)))
        libc.malloc_trim(0)  # hand back what the heap kept now (else only at the next large free, if ever)
    if not ok:
        log.warning("mallopt refused the allocator setting; CPU sampling runs at the default speed")
    _on = enabled and ok
    return ok


def wanted() -> bool:
    """False when the user opted out or set glibc's own variables (left as they chose)."""
    return os.environ.get("BLENDED_DIFFUSION_KEEP_FREED_MEMORY", "1") != "0" and not any(
        k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"))


@contextlib.contextmanager
def keeping_freed_memory(device):
    """Keep freed memory while the block runs on the CPU, then restore and trim (no-op on other
    devices, when already on for the process, or when not ``wanted()``)."""
    scoped = torch.device(device).type == "cpu" and not _on and wanted() and keep_freed_memory(True)
    try:
        yield
    finally:
        if scoped:
            keep_freed_memory(False)
