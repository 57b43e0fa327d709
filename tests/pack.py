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


def reuse_faults(mib: int = 256) -> int:
    """Page faults of writing a ``mib`` MiB tensor right after an equal one was freed: about one per
    4 KiB page with glibc's defaults (the block went back to the kernel), near 0 when the process keeps
    freed memory (models/memory.py)."""
    import resource

    import torch
    torch.ones(mib * 2**18)  # mib MiB of float32, written and freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mib * 2**18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
