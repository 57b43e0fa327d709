"""Types passed between the pack's nodes, and IMAGE/MASK conversions.

ComfyUI IMAGE = [B, H, W, C] float 0..1, MASK = [B, H, W] or [H, W] float 0..1; the engine uses
[B, 3, H, W] images and [B|1, H, W] masks."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import host
from ..models import DDPM, Guide
from ..models.region import MAX_ZOOM

log = logging.getLogger(__name__)
CATEGORY = "Blended Diffusion"
MAX_SEED = 0xFFFFFFFFFFFFFFFF

CONTEXT_TIP = (  # the context input of the nodes that crop around the mask (models/region.py)
    "Margin around the mask's bounding box, as a fraction of the box on each side: the square the model works "
    f"on. The square is resized to the model size, so a small mask gets the model's resolution (enlarged at most "
    f"{MAX_ZOOM}x: at least {256 // MAX_ZOOM} source pixels for a 256 model). More context: the edit sees more of "
    "its surroundings, at a lower resolution.")

# custom socket types (never MODEL/CLIP: these objects are not ComfyUI's)
DDPM_T, CLIP_T, NOISE_T, STEP_T, BLEND_T, AUGMENT_T = (
    "BD_DDPM", "BD_CLIP", "BD_NOISE", "BD_STEP", "BD_BLEND", "BD_AUGMENT")


@dataclass
class NoiseState:
    """NoiseImage's output: the full-resolution source and how far it is noised (x_k)."""
    image: torch.Tensor            # [B, 3, H, W] 0..1
    skip_timesteps: int
    num_steps: int                 # of the DDPM it was made for
    noise: torch.Tensor | None     # [1, 3, S, S] fixed ε for x_k (edit's start="fixed"), or None
    invert: bool = False           # x_k = DDIM inversion of the source (edit's start="ddim_inversion")
    noise_seed: int = 0            # the seed the fixed ε is drawn from (edit's noise_seed)

    @property
    def start(self) -> str:
        """edit()'s ``start`` argument."""
        return "ddim_inversion" if self.invert else "noise" if self.noise is None else "fixed"


@dataclass
class GuidedStep:
    """CLIPGuidedStep's output: the model and the guidance the loop repeats."""
    ddpm: DDPM
    guide: Guide


@dataclass
class BlendRule:
    """MaskBlend's output: the per-step blend (mask already inverted/feathered)."""
    mask: torch.Tensor             # [B|1, H, W] 0..1, 1 = edited
    enforce_background: bool = True
    source: torch.Tensor | None = None  # [B, 3, H, W]; None = the NoiseImage image


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] (or [H, W, C]) → [B, 3, H, W] float. C = 1 (gray) or 2 (gray + alpha) is
    repeated to RGB, C = 4 (RGBA) drops the alpha (the MASK carries the region)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an IMAGE [B, H, W, C] with C = 1, 3 or 4 channels, got shape "
                         f"{tuple(image.shape)}")
    x = image.movedim(-1, 1).float()
    if x.shape[1] <= 2:
        x = x[:, :1].expand(-1, 3, -1, -1)
    return x[:, :3]


def checked_image(image: torch.Tensor, node: str) -> torch.Tensor:
    """IMAGE → [B, 3, H, W] in 0..1: NaN/inf refused, values outside 0..1 clamped with a warning."""
    x = image_to_bchw(image)
    if not torch.isfinite(x).all():
        raise ValueError(f"{node}: the image contains NaN or infinite values; check the node that produced it")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        log.warning("%s: image values span [%.3g, %.3g], outside 0..1: clamped", node, lo, hi)
    return x.clamp(0, 1)


def check_ranges(node_cls, **values) -> None:
    """Validate INT/FLOAT inputs against the node's declared min/max, as ComfyUI does before running
    a node; direct callers (the standalone runner, scripts) get the same error."""
    spec = node_cls.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        entry = declared.get(name)
        if entry is None or entry[0] not in ("INT", "FLOAT") or len(entry) < 2:
            continue
        lo, hi = entry[1].get("min"), entry[1].get("max")
        if not ((lo is None or value >= lo) and (hi is None or value <= hi)):  # NaN fails too
            raise ValueError(f"{node_cls.__name__}: {name} = {value} is outside the allowed range "
                             f"{lo}..{hi}")


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] 0..1 → IMAGE [B, H, W, 3] float32 on the CPU."""
    return x.detach().float().cpu().clamp(0, 1).movedim(1, -1).contiguous()


def mask_to_bhw(mask: torch.Tensor) -> torch.Tensor:
    """MASK [H, W], [B, H, W] or [B, 1, H, W] → [B, H, W] float."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"expected a MASK [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    return mask.float()


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] → [B, *size] (bilinear), unchanged if already that size."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return torch.nn.functional.interpolate(mask[:, None], size=size, mode="bilinear",
                                           align_corners=False)[:, 0].clamp(0, 1)


def same_device(ddpm: DDPM, clip) -> None:
    """Make the DDPM and the CLIP model ready on one compute device: through ComfyUI's model management inside
    ComfyUI (loaded, listed, offloaded on /free), else CLIP moved to the DDPM's device (host.load_models)."""
    host.load_models(ddpm, clip)
