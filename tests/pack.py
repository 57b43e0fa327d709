"""Import the repository root as the package ``blended_diffusion``, as ComfyUI and pip do.

Shared by the test suite (conftest.py) and the scripts in tests/ (benchmark.py, make_workflows.py),
which run with tests/ on sys.path."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    if "blended_diffusion" in sys.modules:
        return sys.modules["blended_diffusion"]
    spec = importlib.util.spec_from_file_location("blended_diffusion", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["blended_diffusion"] = mod
    spec.loader.exec_module(mod)
    return mod


def refault_share(rounds: int = 2) -> float:
    """Share of the pages of a freed block that fault again when an equal block is written right after:
    about 1 with glibc's defaults (a large freed block goes back to the kernel), near 0 when the process
    keeps freed memory (models/memory.py). The block is larger than the whole heap, so it can only come
    from the heap when large blocks are not mmapped, whatever the heap holds free. The last of ``rounds``
    tries counts (the first may still grow the heap)."""
    import resource

    import torch
    heap = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                heap += hi - lo
    n = (heap + 256 * 2**20) // 4  # float32 elements
    share = 0.0
    for _ in range(rounds):
        torch.ones(n)  # written and freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(n)
        share = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (n * 4 / 4096)
    return share
