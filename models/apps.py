"""Applications on top of the blended loop: CLIP ranking (§4.2.3), evaluation, and text-guided
extrapolation (supplement B.5.2). Images are [B, 3, H, W] in 0..1, masks [B|1, H, W] in 0..1."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .blended import blended_diffusion, generators
from .clip import ClipModel
from .edit import check_finite, grad_mode
from .guidance import Guide
from .metrics import clip_distance as clip_scores  # noqa: F401  (the ranking score, used here and by callers)
from .metrics import lpips_distance, unedited

log = logging.getLogger(__name__)


def rank(clip: ClipModel, images: torch.Tensor, mask: torch.Tensor | None, prompt: str):
    """(order best first, scores in the original order)."""
    scores = clip_scores(clip, images, mask, prompt)
    return torch.argsort(scores, stable=True), scores


@torch.no_grad()
def evaluate(images: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
             clip: ClipModel | None = None, prompt: str = "") -> list[dict]:
    """Per result: CLIP distance to the prompt under the mask, LPIPS and max |difference| outside
    the mask versus the source (0 means the background is exactly preserved)."""
    bg, src_bg = unedited(images, mask), unedited(source.to(images), mask)
    max_abs = (bg - src_bg).abs().amax(dim=(1, 2, 3))
    lp = lpips_distance(bg, src_bg.expand_as(bg))
    dist = clip_scores(clip, images, mask, prompt) if (clip is not None and prompt) else None
    return [{"clip_distance": None if dist is None else float(dist[i]), "lpips_bg": float(lp[i]),
             "max_abs_bg": float(max_abs[i])} for i in range(images.shape[0])]


# --- extrapolation ----------------------------------------------------------------------------
_TO_RIGHT = {  # view each direction as "extend to the right", and back
    "right": (lambda x: x, lambda x: x),
    "left": (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "down": (lambda x: x.transpose(-1, -2), lambda x: x.transpose(-1, -2)),
    "up": (lambda x: x.transpose(-1, -2).flip(-1), lambda x: x.flip(-1).transpose(-1, -2)),
}


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    h = x.shape[-2]
    extra = (-h) % multiple
    return (F.pad(x, (0, 0, 0, extra), mode="replicate") if extra else x), h


def extrapolate(ddpm, clip: ClipModel | None, image: torch.Tensor, prompts: dict[str, str],
                amount: float = 0.5, *, k_min: int | None = None, k_max: int | None = None,
                final_k: int | None = None, seed: int = 404, clip_lambda: float = 1000.0,
                range_lambda: float = 50.0, num_views: int = 8, ddim: bool = False,
                callback=None) -> torch.Tensor:
    """Extend ``image`` [1,3,H,W] by ``amount`` × its size in each direction named in ``prompts``
    (left/right/up/down → prompt; an empty prompt extends without CLIP guidance).

    Supplement B.5.2: the canvas is worked at the model's size (height for left/right, width for
    up/down). Each stage shifts a window a quarter of the model size towards the new side, fills the
    new quarter by reflection, and inpaints it with Algorithm 2 under that direction's prompt, with
    k growing from ``k_min`` to ``k_max`` over every 4 quarters; finally one low-k unguided pass
    (``final_k``) over the whole canvas evens out the new areas. The original pixels (at working
    resolution) are kept exactly. Returns [1, 3, H', W'] in 0..1 at working resolution."""
    from .augment import AugmentSettings
    bad = set(prompts) - set(_TO_RIGHT)
    if bad:
        raise ValueError(f"unknown extrapolation direction(s) {sorted(bad)}; use left, right, up, down")
    if not prompts:
        raise ValueError("name at least one direction (left, right, up or down) to extrapolate")
    if not 0 < amount <= 8:
        raise ValueError(f"amount = {amount}: give the growth per direction as a fraction of the "
                         "image size, in (0, 8] (0.5 adds half the width)")
    T, S = ddpm.num_steps, ddpm.image_size
    k_min = k_min or max(1, round(0.5 * T))
    k_max = k_max or max(k_min, round(0.8 * T))
    final_k = round(0.2 * T) if final_k is None else final_k
    if not (1 <= k_min <= k_max <= T and 0 <= final_k <= T):
        raise ValueError(f"need 1 <= k_min ({k_min}) <= k_max ({k_max}) <= steps ({T}) "
                         f"and 0 <= final_k ({final_k}) <= steps")
    h, w = image.shape[-2:]
    horizontal = any(d in prompts for d in ("left", "right"))
    scale = S / h if horizontal else S / w
    canvas = F.interpolate(image.float().cpu(), size=(round(h * scale), round(w * scale)), mode="bicubic",
                           antialias=True, align_corners=False).clamp(0, 1)
    known = torch.ones_like(canvas[:, :1])  # 1 = original pixel
    grow = {"h": math.ceil(amount * canvas.shape[-1]), "v": math.ceil(amount * canvas.shape[-2])}
    q, stage = S // 4, 0
    dev, multiple = ddpm.device, 2 ** (len(ddpm.config["channel_mult"]) - 1)
    with grad_mode():
        ddpm.thaw()
        if clip is not None:
            clip.thaw()
        for direction in [d for d in ("left", "right", "up", "down") if d in prompts]:
            fwd, back = _TO_RIGHT[direction]
            c, kn = fwd(canvas), fwd(known)
            target = c.shape[-1] + grow["h" if direction in ("left", "right") else "v"]
            guide = Guide(clip=clip, prompt=prompts[direction], clip_lambda=clip_lambda,
                          range_lambda=range_lambda, augment=AugmentSettings(num_views=num_views))
            j = 0
            while c.shape[-1] < target:
                win = c[..., -(S - q):]                                  # last 3/4 of a window
                if win.shape[-1] < S - q:  # a canvas narrower than that: replicate its first column
                    win = F.pad(win, (S - q - win.shape[-1], 0, 0, 0), mode="replicate")
                win = torch.cat([win, win[..., -q:].flip(-1)], dim=-1)   # reflection-pad a quarter
                m = torch.zeros_like(win[:, :1])
                m[..., -q:] = 1
                k = k_min + (k_max - k_min) * (j % 4) // 3
                src, hh = _pad_to(win * 2 - 1, multiple)
                mm, _ = _pad_to(m, multiple)
                x0 = blended_diffusion(ddpm, src.to(dev), mm.to(dev), guide, k,
                                       generators(seed, stage, 1), ddim=ddim, callback=callback)
                check_finite(x0)
                new = ((x0[..., :hh, -q:].cpu() + 1) / 2).clamp(0, 1)
                c = torch.cat([c, new], dim=-1)
                kn = torch.cat([kn, torch.zeros_like(new[:, :1])], dim=-1)
                j, stage = j + 1, stage + 1
            c, kn = c[..., :target], kn[..., :target]
            canvas, known = back(c), back(kn)
        if final_k > 0:  # one low-k unguided pass over the canvas; original pixels stay exact
            src = canvas * 2 - 1
            src, hh = _pad_to(src, multiple)
            src = src.transpose(-1, -2)
            src, ww = _pad_to(src, multiple)
            src = src.transpose(-1, -2)
            m = 1 - known
            m = F.pad(m, (0, src.shape[-1] - m.shape[-1], 0, src.shape[-2] - m.shape[-2]), value=0)
            x0 = blended_diffusion(ddpm, src.to(dev), m.to(dev), Guide(), final_k,
                                   generators(seed, stage, 1), ddim=ddim, callback=callback)
            new = ((x0[..., :canvas.shape[-2], :canvas.shape[-1]].cpu() + 1) / 2).clamp(0, 1)
            canvas = torch.where(known > 0, canvas, new)
    return canvas
