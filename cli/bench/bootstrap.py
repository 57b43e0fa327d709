"""Ray worker setup: make the pack importable as ``blended_diffusion`` in every worker process.

Ray sends the actor class by reference (``blended_diffusion.cli.bench.runner``), so each worker must import the
pack by that name. A pip install provides it; a checkout in ComfyUI's ``custom_nodes/comfyui-blended-diffusion``
(a folder name that is no Python name) does not. ``hook(root)`` returns the function Ray runs first in each
worker (``runtime_env["worker_process_setup_hook"]``): where the driver's pack folder ``root`` exists (the
driver's machine, or a cluster with the same paths) it loads ``root/__init__.py`` as the package
``blended_diffusion``, as ComfyUI and tests/pack.py do, so workers run the driver's code; elsewhere it imports
the installed pack.
This module imports nothing from the pack: the runner sends it to the workers by value."""
from __future__ import annotations


def hook(root: str):
    def setup_blended_diffusion() -> None:
        import importlib.util
        import os
        import sys
        if "blended_diffusion" in sys.modules:
            return
        init = os.path.join(root, "__init__.py")
        if not os.path.isfile(init):
            if importlib.util.find_spec("blended_diffusion") is not None:
                import blended_diffusion  # noqa: F401
                return
            raise ImportError(f"blended_diffusion is not installed on this Ray node ({os.uname().nodename}) and "
                              f"{root} does not exist here: pip install the pack on every node, or put it at the "
                              "same path")
        spec = importlib.util.spec_from_file_location("blended_diffusion", init, submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules["blended_diffusion"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["blended_diffusion"]
            raise
    return setup_blended_diffusion
