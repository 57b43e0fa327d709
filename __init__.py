"""Blended Diffusion for ComfyUI: text-driven region editing of real images."""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # the engine stays importable if the node layer cannot load
    import logging
    logging.getLogger(__name__).warning("Blended Diffusion nodes not loaded: %s", e)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"  # shows RankByCLIP / Evaluate scores on the node
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
