"""Import a ComfyUI checkout (COMFYUI_PATH) into the test process, or skip the calling test module.

Its folder goes on sys.path (appended: the pack's own folders never shadow it), and without CUDA ComfyUI is
set to --cpu before ``comfy.model_management`` is imported, as ``main.py --cpu`` does."""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch


def load_comfyui(what: str) -> Path:
    """The checkout's path; skips the module (``what``: the tests it holds) without a usable ComfyUI."""
    comfy = os.environ.get("COMFYUI_PATH", "")
    if not comfy or not (Path(comfy) / "comfy" / "model_management.py").is_file():
        pytest.skip(f"set COMFYUI_PATH to a ComfyUI checkout to run {what}", allow_module_level=True)
    root = Path(comfy).resolve()
    if str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        from comfy.cli_args import args as comfy_args
        if not torch.cuda.is_available():
            comfy_args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401  (the rest of ComfyUI's requirements)
        importlib.import_module("folder_paths")  # with comfy.model_management: the pack's host uses ComfyUI's services
    except ImportError as e:  # a checkout whose requirements this interpreter lacks
        pytest.skip(f"ComfyUI at {comfy} does not import here ({e}): run with its interpreter",
                    allow_module_level=True)
    return root
