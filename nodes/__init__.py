"""ComfyUI nodes of the Blended Diffusion pack (classic V1 API: NODE_CLASS_MAPPINGS)."""
from .. import host
from .apps import BlendedDiffusionEvaluate, Extrapolate, RankByCLIP
from .loaders import LoadCLIP, LoadDDPM
from .nulltext import NODE_CLASS_MAPPINGS as _NULLTEXT_NODES
from .nulltext import NODE_DISPLAY_NAME_MAPPINGS as _NULLTEXT_NAMES
from .sampling import BlendedDiffusionSampler, CLIPGuidedStep, ExtendingAugment, MaskBlend, NoiseImage

host.register()

NODE_CLASS_MAPPINGS = {
    "LoadDDPM": LoadDDPM,
    "LoadCLIP": LoadCLIP,
    "NoiseImage": NoiseImage,
    "CLIPGuidedStep": CLIPGuidedStep,
    "MaskBlend": MaskBlend,
    "ExtendingAugment": ExtendingAugment,
    "BlendedDiffusionSampler": BlendedDiffusionSampler,
    "RankByCLIP": RankByCLIP,
    "Extrapolate": Extrapolate,
    "BlendedDiffusionEvaluate": BlendedDiffusionEvaluate,
    **_NULLTEXT_NODES,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadDDPM": "Load DDPM (guided-diffusion)",
    "LoadCLIP": "Load CLIP (guidance)",
    "NoiseImage": "Noise Image (x_k)",
    "CLIPGuidedStep": "CLIP-Guided Step",
    "MaskBlend": "Mask Blend",
    "ExtendingAugment": "Extending Augmentations",
    "BlendedDiffusionSampler": "Blended Diffusion Sampler",
    "RankByCLIP": "Rank by CLIP",
    "Extrapolate": "Extrapolate (text-guided)",
    "BlendedDiffusionEvaluate": "Evaluate Edit (CLIP, LPIPS, background)",
    **_NULLTEXT_NAMES,
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
