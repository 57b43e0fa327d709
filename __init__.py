"""Blended Diffusion for ComfyUI: text-driven region editing of real images.

ComfyUI reads ``NODE_CLASS_MAPPINGS``, ``NODE_DISPLAY_NAME_MAPPINGS`` and ``WEB_DIRECTORY`` here. The two node
mappings are resolved on first access (a module ``__getattr__``, PEP 562): ComfyUI's loader asks for them right
after importing the pack, which loads ``nodes/`` (and registers the pack's model folders with the host), while
importing the library (``blended_diffusion.models``) or running the command line imports no node module.
"""
WEB_DIRECTORY = "./web"  # shows the text reports the nodes return (scores, inversion reports) on the node
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

_NODE_MAPPINGS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str):
    if name in _NODE_MAPPINGS:
        from . import nodes
        value = globals()[name] = getattr(nodes, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
