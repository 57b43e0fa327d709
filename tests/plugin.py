"""pytest plugin (``-p plugin`` in pyproject.toml): collect the pack root as a plain folder.

The root holds ComfyUI's entry point ``__init__.py``, so pytest would collect it as a Python package and
import that file under the folder's name: no valid module name in a clone called
``comfyui-blended-diffusion`` (an ImportError for every test), a second copy of the pack in one called
``noh``. The suite imports the pack itself, as ``blended_diffusion`` (tests/pack.py)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
