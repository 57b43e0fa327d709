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
