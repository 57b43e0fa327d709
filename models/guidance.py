"""The guidance loss of the paper and the guided UNet evaluation (one forward pass per step)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

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
    # (every λ above is one entry of LOSS_TERMS below)
    fast: bool = False         # skip the UNet backward: ∂x̂0/∂x_t taken as its linear part only

    @property
    def uses_clip(self) -> bool:
        return bool(self.prompt.strip()) and self.clip is not None and self.clip_lambda != 0

    @property
    def active(self) -> bool:
        return self.uses_clip or any(getattr(self, t.weight) != 0 for t in LOSS_TERMS if not t.with_clip)

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


@dataclass
class LossInputs:
    """What a loss term sees at one step: x̂0, x_t, x_in = x̂0·fac + x_t·(1−fac), the source and the mask
    at the model's resolution (all [B, 3, S, S] in [−1, 1] but the mask), and the augmentation matrices."""
    guide: Guide
    x0: torch.Tensor
    x: torch.Tensor
    x_in: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    mats: torch.Tensor | None


@dataclass(frozen=True)
class LossTerm:
    """One term of the guidance loss: λ · Σ_batch ``fn(inputs)``, λ being the Guide field ``weight``.
    ``node`` is its widget on CLIPGuidedStep (default, max, step, tooltip), in this order."""
    weight: str
    fn: Callable[[LossInputs], torch.Tensor]  # one value per result, [B] (or [B, 1, 1, 1])
    node: tuple[float, float, float, str]
    with_clip: bool = False  # applied whenever the CLIP loss is (prompt, CLIP model, clip_lambda ≠ 0)


def _clip_term(i: LossInputs) -> torch.Tensor:
    clip = i.guide.clip
    masked = F.interpolate(i.x_in * i.mask, size=(clip.input_size,) * 2, mode="bilinear",
                           align_corners=False, antialias=True)
    views = extending_augmentations(masked, i.mats)                 # [B*N, 3, S, S]
    emb = clip.encode_image(clip.preprocess(views))                 # all views, one CLIP call
    return d_clip(emb, clip.encode_text(i.guide.prompt)).view(i.x.shape[0], -1).mean(1)


def _background(i: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return i.x_in * (1 - i.mask), i.source * (1 - i.mask)          # Algorithm 1: D_bg outside the mask


# The guidance loss, term by term (a new loss: a Guide field for its λ and one entry here; the
# CLIPGuidedStep node shows every entry as a widget).
LOSS_TERMS = (
    LossTerm("clip_lambda", _clip_term, (1000.0, 100000.0, 10.0,
             "Weight of the CLIP loss (paper: 1000). Higher follows the prompt harder, with more artefacts."),
             with_clip=True),
    LossTerm("range_lambda", lambda i: (i.x0 - i.x0.clamp(-1, 1)).pow(2).mean((1, 2, 3)), (50.0, 10000.0, 1.0,
             "Weight of the range loss that keeps x̂0 inside [-1, 1] (paper: 50)."), with_clip=True),
    LossTerm("lpips_lambda", lambda i: lpips_model().to(i.x.device)(*_background(i)), (0.0, 100000.0, 10.0,
             "Algorithm 1 background preservation: LPIPS to the source outside the mask (official: "
             "1000 when on). Not needed with MaskBlend.")),
    LossTerm("l2_lambda", lambda i: (lambda bg, src: (bg - src).pow(2).mean((1, 2, 3)))(*_background(i)),
             (0.0, 1000000.0, 100.0, "Algorithm 1 background preservation: MSE to the source outside the "
                                     "mask (official: 10000 when on). Not needed with MaskBlend.")),
)


def guidance_loss(guide: Guide, x0: torch.Tensor, x: torch.Tensor, fac: torch.Tensor,
                  source: torch.Tensor, mask: torch.Tensor, mats: torch.Tensor | None) -> torch.Tensor:
    """Σ over LOSS_TERMS of λ · (term summed over the batch), so each result's gradient depends on that
    result alone. x_in = x̂0·fac + x_t·(1−fac), fac = sqrt(1−ᾱ_t), as in the official code."""
    inputs = LossInputs(guide, x0, x, x0 * fac + x * (1 - fac), source, mask, mats)
    loss = x.new_zeros(())
    for term in LOSS_TERMS:
        weight = getattr(guide, term.weight)
        if guide.uses_clip if term.with_clip else weight != 0:
            loss = loss + term.fn(inputs).sum() * weight
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
    loss = guidance_loss(guide, x0, x, ddpm.schedule.sqrt_1m_ac[i], source, mask, mats)
    grad = -torch.autograd.grad(loss, x)[0]
    return eps.detach(), None if v is None else v.detach(), grad
