"""Pure-torch engine of the pack (no ComfyUI imports): loaders and the Blended Diffusion algorithms."""
from .augment import AugmentSettings
from .blended import blended_diffusion, generators
from .checkpoint import CheckpointError
from .clip import ClipModel, d_clip, load_clip
from .ddpm import DDPM, load_ddpm
from .edit import edit
from .guidance import Guide

__all__ = ["AugmentSettings", "CheckpointError", "ClipModel", "DDPM", "Guide", "blended_diffusion",
           "d_clip", "edit", "generators", "load_clip", "load_ddpm"]
