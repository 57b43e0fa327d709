"""Full-resolution editing: crop a square around the mask, work at the model size, paste back.
The square is the mask's box plus a context margin, resized to the model size both ways (a small
mask is enlarged, as crop-and-stitch inpainting does). Images here are [B, C, H, W]; pixels outside
the mask are never resampled."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    side: int  # may reach outside the image: that part is replicate-padded context


MAX_ZOOM = 4  # a crop is enlarged at most 4x: never smaller than size / 4 source pixels (64 for a 256 model)


def check_context(context: float, name: str = "context") -> None:
    """``context`` (the margin around the mask's box, a fraction of the box) is a finite number >= 0."""
    if not 0 <= context < float("inf"):
        raise ValueError(f"{name} = {context}: it must be a finite number >= 0 (the margin around the mask "
                         "as a fraction of its box on each side; 0.25 by default)")


def plan_box(mask: torch.Tensor, size: int, context: float = 0.25, max_zoom: float = MAX_ZOOM) -> Box:
    """Square around the mask's bounding box (mask [H, W]), grown by ``context`` of its side on each
    side. A small mask's square is enlarged to the model's ``size``, so the mask gets the model's
    resolution, at most ``max_zoom`` times (the square is at least size / max_zoom pixels when the
    image allows; max_zoom 1 = never smaller than the model), and at most the image's longer side."""
    check_context(context)
    h, w = mask.shape
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if len(ys) == 0:
        ys, xs = torch.tensor([0, h - 1]), torch.tensor([0, w - 1])
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    side = int(max(y1 - y0, x1 - x0) * (1 + 2 * context))
    side = max(side, min(math.ceil(size / max_zoom), max(h, w)))
    side = min(side, max(h, w))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top = min(max(cy - side // 2, 0), max(h - side, 0)) if side <= h else (h - side) // 2
    left = min(max(cx - side // 2, 0), max(w - side, 0)) if side <= w else (w - side) // 2
    return Box(top, left, side)


def _pad_for(box: Box, h: int, w: int):
    pt, pl = max(-box.top, 0), max(-box.left, 0)
    pb, pr = max(box.top + box.side - h, 0), max(box.left + box.side - w, 0)
    return pl, pr, pt, pb


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def crop(x: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """The box of x resized to size×size (outside-image parts replicate the border)."""
    h, w = x.shape[-2:]
    pad = _pad_for(box, h, w)
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    t, l = box.top + pad[2], box.left + pad[0]
    return resize(x[..., t:t + box.side, l:l + box.side], size).clamp(0, 1)


def paste(image: torch.Tensor, edited: torch.Tensor, box: Box, mask: torch.Tensor) -> torch.Tensor:
    """Composite ``edited`` (model size) back into ``image`` (full size) under ``mask`` [B|1,1,H,W].
    Where mask == 0 the result is ``image`` exactly."""
    h, w = image.shape[-2:]
    big = resize(edited, box.side).clamp(0, 1)
    pl, pr, pt, pb = _pad_for(box, h, w)
    big = big[..., pt:box.side - pb, pl:box.side - pr]
    out = image.expand(edited.shape[0], -1, -1, -1).clone()
    t, l = max(box.top, 0), max(box.left, 0)
    win = out[..., t:t + big.shape[-2], l:l + big.shape[-1]]
    m = mask[..., t:t + big.shape[-2], l:l + big.shape[-1]]
    out[..., t:t + big.shape[-2], l:l + big.shape[-1]] = torch.where(m > 0, big * m + win * (1 - m), win)
    return out
