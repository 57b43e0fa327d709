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
    global _on, _returning
    if enabled:
        ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    else:
        ok = (bool(mallopt(M_MMAP_THRESHOLD, RESTORE_MMAP_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX))
              and bool(mallopt(M_TRIM_THRESHOLD, RESTORE_TRIM_THRESHOLD)))
        libc.malloc_trim(0)  # hand back what the heap kept now (else only at the next large free, if ever)
    if not ok:
        log.warning("mallopt refused the allocator setting; CPU sampling runs at the default speed")
    _on, _returning = enabled and ok, False
    return ok


def wanted() -> bool:
    """False when the user opted out or set glibc's own variables (left as they chose), or when the process's
    address space is limited (see ``address_space_limited``)."""
    return os.environ.get("BLENDED_DIFFUSION_KEEP_FREED_MEMORY", "1") != "0" and not any(
        k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")) and not address_space_limited()


def setup_cpu_process() -> str | None:
    """The command line's allocator setting for a whole CPU run: keep freed memory (faster steps) when
    ``wanted()``; under an address-space limit return it at once instead (``return_freed_memory``), so that a
    batch halved after an out-of-memory finds room; nothing when the user set glibc's variables. Returns
    "keep", "return" or None."""
    if wanted():
        return "keep" if keep_freed_memory() else None
    if address_space_limited() and not any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                                                      "MALLOC_MMAP_THRESHOLD_")):
        return "return" if return_freed_memory() else None
    return None


def address_space_limited() -> bool:
    """A limit on the process's data or address space (``ulimit -d`` / ``-v``, RLIMIT_DATA / RLIMIT_AS) or the
    kernel's strict overcommit (vm.overcommit_memory = 2). There a heap that keeps its freed memory stays
    charged after an out-of-memory, even once glibc has handed the pages back: the retry with half the batch
    would find no room (what does not come from malloc, like oneDNN's code buffers, fails first)."""
    try:
        import resource
        if any(resource.getrlimit(r)[0] != resource.RLIM_INFINITY for r in (resource.RLIMIT_DATA, resource.RLIMIT_AS)):
            return True
    except (ImportError, ValueError, OSError):  # no resource module (Windows)
        pass
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return False


RETURN_MMAP_THRESHOLD = 256 * 2**10
_returning = False  # set by return_freed_memory()


def return_freed_memory() -> bool:
    """The opposite of ``keep_freed_memory``, for a CPU short of memory: from now on every block of 256 KiB or
    more gets its own mapping, unmapped as soon as it is freed, and the heap's free memory goes back to the
    kernel now (glibc ``mallopt``, ``malloc_trim``). Used after an out-of-memory on the CPU, and from the start
    where the address space is limited (``address_space_limited``): a heap that kept a failed attempt's blocks
    would leave the retry with half the batch no room, first of all for what does not come from malloc
    (oneDNN's code buffers). Costs page faults on every large block, like glibc's defaults before their mmap
    threshold grows. Undone by ``keep_freed_memory`` (on or off). Returns whether it was applied."""
    global _on, _returning
    libc = _libc()
    if libc is None:
        return False
    ok = (bool(libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)) and bool(libc.mallopt(M_MMAP_THRESHOLD, RETURN_MMAP_THRESHOLD))
          and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * RETURN_MMAP_THRESHOLD)))
    libc.malloc_trim(0)
    _on, _returning = False, ok
    return ok


OOM_FIXES = "use a smaller model, fp16/bf16 precision, or fewer augmentation views (on the CPU: close other programs)"


def out_of_memory(e: BaseException) -> str | None:
    """Whether ``e`` is the device running out of memory: "sure" for torch.OutOfMemoryError (CUDA, MPS, XPU),
    Python's MemoryError and torch's CPU allocator failure (a plain RuntimeError, "DefaultCPUAllocator: can't
    allocate memory: you tried to allocate N bytes"); "likely" for oneDNN's "could not create a primitive", which
    a CPU near its memory limit raises when the scratch memory of a convolution cannot be allocated (it has
    other, rare causes, so it is never reported as a certain out-of-memory); None for anything else."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return "sure"
    if isinstance(e, RuntimeError):
        text = str(e)
        if "can't allocate memory" in text:
            return "sure"
        if "could not create a primitive" in text:
            return "likely"
    return None


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
