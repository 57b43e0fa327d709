"""The guidance loss of the paper and the guided UNet evaluation (one forward pass per step)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .augment import AugmentSettings, extending_augmentations, random_homographies
from .clip import ClipModel, d_clip


@dataclass
class Guide:
    """What CLIPGuidedStep configures. An empty prompt and zero background weights mean no guidance."""
    clip: ClipModel | None = None
    prompt: str = ""
    clip_lambda: float = 1000.0
    range_lambda: float = 50.0
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    lpips_lambda: float = 0.0  # Algorithm 1 background preservation (LPIPS term)
    l2_lambda: float = 0.0     # Algorithm 1 background preservation (MSE term)
    fast: bool = False         # skip the UNet backward: ∂x̂0/∂x_t taken as its linear part only

    @property
    def uses_clip(self) -> bool:
        return bool(self.prompt.strip()) and self.clip is not None and self.clip_lambda != 0

    @property
    def active(self) -> bool:
        return self.uses_clip or self.lpips_lambda != 0 or self.l2_lambda != 0

    def __post_init__(self):
        if self.prompt.strip() and self.clip is None and self.clip_lambda != 0:
            raise ValueError("a prompt needs a CLIP model: connect LoadCLIP (or pass --clip)")


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """CPU → device without a host-device sync (pinned memory, non-blocking copy on CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def lpips_model(net: str = "vgg"):
    """LPIPS for the Algorithm 1 background loss and the evaluation (models/metrics.py). Its backbone comes from
    torchvision's pretrained weights; BLENDED_DIFFUSION_LPIPS_RANDOM=1 builds it untrained (tests). One model
    per network, however it is named in the call (``lpips_model()`` and ``lpips_model("vgg")`` share it)."""
    return _lpips_model(net)


@functools.lru_cache(maxsize=3)
def _lpips_model(net: str):
    import os

    import lpips

    from . import weights as W
    random_backbone = os.environ.get("BLENDED_DIFFUSION_LPIPS_RANDOM") == "1"
    if not random_backbone and net in W.LPIPS_WEIGHTS and W.offline() and \
            not (W.torch_hub_checkpoints() / W.LPIPS_WEIGHTS[net].name).is_file():
        raise W.WeightsError(W.lpips_missing_message(net, f"{W.ENV_OFFLINE} is set"))  # not torchvision's download
    try:
        with torch.inference_mode(False):
            return lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False).eval().requires_grad_(False)
    except Exception as e:
        if net in W.LPIPS_WEIGHTS:
            raise W.WeightsError(W.lpips_missing_message(net, e)) from None
        raise RuntimeError(f"LPIPS needs torchvision's pretrained {net} weights, which could not be "
                           f"loaded ({e}); connect to the internet once or put them in the torch hub "
                           "cache ($TORCH_HOME/hub/checkpoints)") from None


def guidance_loss(guide: Guide, x0: torch.Tensor, x: torch.Tensor, fac: torch.Tensor,
                  source: torch.Tensor, mask: torch.Tensor, mats: torch.Tensor | None) -> torch.Tensor:
    """Summed over the batch, so each result's gradient depends on that result alone.

    x_in = x̂0·fac + x_t·(1−fac), fac = sqrt(1−ᾱ_t), as in the official code."""
    x_in = x0 * fac + x * (1 - fac)
    loss = x.new_zeros(())
    if guide.uses_clip:
        clip = guide.clip
        masked = F.interpolate(x_in * mask, size=(clip.input_size,) * 2, mode="bilinear",
                               align_corners=False, antialias=True)
        views = extending_augmentations(masked, mats)                   # [B*N, 3, S, S]
        emb = clip.encode_image(clip.preprocess(views))                 # all views, one CLIP call
        dist = d_clip(emb, clip.encode_text(guide.prompt)).view(x.shape[0], -1).mean(1)
        loss = loss + dist.sum() * guide.clip_lambda
        loss = loss + (x0 - x0.clamp(-1, 1)).pow(2).mean((1, 2, 3)).sum() * guide.range_lambda
    if guide.lpips_lambda or guide.l2_lambda:  # Algorithm 1: D_bg outside the mask
        bg, src_bg = x_in * (1 - mask), source * (1 - mask)
        if guide.lpips_lambda:
            lp = lpips_model().to(x.device)
            loss = loss + lp(bg, src_bg).sum() * guide.lpips_lambda
        if guide.l2_lambda:
            loss = loss + (bg - src_bg).pow(2).mean((1, 2, 3)).sum() * guide.l2_lambda
    return loss


def guided_eps(ddpm, x, i, guide: Guide, source, mask, gens, y=None):
    """UNet output at step i and, if guidance is active, −∇_{x_t} L from the *same* forward pass.

    Returns (eps, var_values or None, grad or None)."""
    if not guide.active:
        with torch.no_grad():
            eps, v = ddpm.eps_and_var(x, i, y)
        return eps, v, None
    mats = None
    if guide.uses_clip:
        mats = to_device(torch.stack([random_homographies(g, guide.augment.num_views, guide.clip.input_size,
                                                          guide.augment) for g in gens]), x.device)
    x = x.detach().requires_grad_(True)
    with torch.set_grad_enabled(not guide.fast):
        eps, v = ddpm.eps_and_var(x, i, y)
    x0 = ddpm.pred_xstart(x, i, eps)
    loss = guidance_loss(guide, x0, x, ddpm.sched["sqrt_1m_ac"][i], source, mask, mats)
    grad = -torch.autograd.grad(loss, x)[0]
    return eps.detach(), None if v is None else v.detach(), grad
