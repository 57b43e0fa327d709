"""Types passed between the pack's nodes, and IMAGE/MASK conversions.

ComfyUI IMAGE = [B, H, W, C] float 0..1, MASK = [B, H, W] or [H, W] float 0..1; the engine uses
[B, 3, H, W] images and [B|1, H, W] masks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import DDPM, Guide

CATEGORY = "Blended Diffusion"
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# custom socket types (never MODEL/CLIP: these objects are not ComfyUI's)
DDPM_T, CLIP_T, NOISE_T, STEP_T, BLEND_T, AUGMENT_T = (
    "BD_DDPM", "BD_CLIP", "BD_NOISE", "BD_STEP", "BD_BLEND", "BD_AUGMENT")


@dataclass
class NoiseState:
    """NoiseImage's output: the full-resolution source and how far it is noised (x_k)."""
    image: torch.Tensor            # [B, 3, H, W] 0..1
    skip_timesteps: int
    num_steps: int                 # of the DDPM it was made for
    noise: torch.Tensor | None     # [1, 3, S, S] fixed ε for x_k, or None: each result draws its own


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
    """IMAGE [B, H, W, C] (or [H, W, C]) → [B, 3, H, W] float."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE [B, H, W, C], got shape {tuple(image.shape)}")
    x = image.movedim(-1, 1).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3]


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
    """Put the CLIP model on the DDPM's device (moved outside inference mode)."""
    if clip is not None and clip.device != ddpm.device:
        with torch.inference_mode(False):
            clip.to(ddpm.device)
