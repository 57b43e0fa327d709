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


def refault_share(block_mib: int | None = None, rounds: int = 4) -> float:
    """Share of the pages of a freed block that fault again when an equal block is written right after:
    about 1 with glibc's defaults (a large freed block goes back to the kernel), near 0 when the process
    keeps freed memory (models/memory.py). The last of ``rounds`` tries counts (the first ones may still
    land in madvised free chunks or grow the heap). Default block: larger than the whole heap, so with
    glibc's defaults it cannot come from free heap space and must be mmapped; to check that memory is
    kept, give a fixed size (a block larger than the heap would grow a never-trimmed heap every time)."""
    import resource

    import torch
    if block_mib is None:
        heap = 0
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("[heap]"):
                    lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                    heap += hi - lo
        n = (heap + 256 * 2**20) // 4  # float32 elements
    else:
        n = block_mib * 2**18
    share = 0.0
    for _ in range(rounds):
        torch.ones(n)  # written and freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(n)
        share = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (n * 4 / 4096)
    return share
