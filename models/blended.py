"""Blended Diffusion: Algorithm 2 (DDPM) and Algorithm 3 (DDIM) of the paper; Algorithm 1 without
the blend. Tensors are [B, 3, S, S] in [-1, 1] at the model's resolution; masks [B|1, 1, S, S] in 0..1.

Differences from the official code (omriav/blended-diffusion), on purpose:
- one UNet forward per step: μ, Σ, x̂0 and the CLIP gradient come from the same pass (the official
  code runs a second forward inside cond_fn);
- the background is noised to the level of the sample it is blended with (t−1); the official code
  noises it to t;
- each result has its own random generator, so result i depends only on (seed, i).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from .ddpm import ddim_move
from .guidance import Guide, guided_eps, to_device

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step done, total, x̂0) → None; may raise


def generators(seed: int, first: int, n: int) -> list[torch.Generator]:
    """One CPU generator per result; result i's stream depends only on (seed, i)."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed & (2**63 - 1), i])
                                              .generate_state(1, np.uint64)[0] >> 1))
            for i in range(first, first + n)]


def randn(gens, shape, device) -> torch.Tensor:
    """Noise drawn from each result's CPU generator: the same seed gives the same result on any device."""
    return to_device(torch.stack([torch.randn(shape, generator=g) for g in gens]), device)


def class_labels(ddpm, gens, class_label, device):
    """Class-conditional models: a fixed class, or a random class per step (official code)."""
    if ddpm.num_classes is None:
        return None
    if class_label is not None and class_label >= 0:
        return torch.full((len(gens),), class_label, dtype=torch.long, device=device)
    return to_device(torch.cat([torch.randint(ddpm.num_classes, (1,), generator=g) for g in gens]), device)


def ddpm_step(ddpm, x, i, eps, v, grad, noise):
    """x_{t−1} ~ N(μ + Σ∇, Σ): guided-diffusion's p_sample with condition_mean (clip_denoised=False)."""
    mean, log_var = ddpm.posterior(x, i, ddpm.pred_xstart(x, i, eps), v)
    if grad is not None:
        mean = mean + log_var.exp() * grad
    return mean + (i > 0) * (0.5 * log_var).exp() * noise


def ddim_step(ddpm, x, i, eps, grad):
    """ε̂ = ε − sqrt(1−ᾱ_t)∇;  x_{t−1} = sqrt(ᾱ_{t−1})·x̂0(ε̂) + sqrt(1−ᾱ_{t−1})·ε̂  (eta 0,
    guided-diffusion's ddim_sample with condition_score; the formula is models.ddpm.ddim_move)."""
    s = ddpm.schedule
    if grad is not None:
        eps = eps - s.sqrt_1m_ac[i] * grad
    return ddim_move(x, eps, s.ac[i], s.ac_prev[i], x0=s.pred_xstart(x, i, eps))


def blended_diffusion(ddpm, source: torch.Tensor, mask: torch.Tensor, guide: Guide, k: int,
                      gens: list[torch.Generator], ddim: bool = False, blend: bool = True,
                      enforce_background: bool = True, class_label: int | None = None,
                      x_start: torch.Tensor | None = None, callback: StepCallback | None = None):
    """Algorithm 2 (DDPM) / Algorithm 3 (DDIM); ``blend=False`` gives Algorithm 1.

    k: number of denoising steps (respaced steps minus skip_timesteps). Returns x̂0 of the last step."""
    noise = lambda: randn(gens, source.shape[1:], source.device)  # noqa: E731
    x = ddpm.q_sample(source, k - 1, noise()) if x_start is None else x_start  # x_k ~ q(x_k | x_0)
    for step, i in enumerate(reversed(range(k))):
        y = class_labels(ddpm, gens, class_label, x.device)
        eps, v, grad = guided_eps(ddpm, x, i, guide, source, mask, gens, y)  # μ,Σ,x̂0,∇ in one pass
        x0 = ddpm.pred_xstart(x, i, eps)                                   # x̂0 (eq. 5)
        x_fg = ddim_step(ddpm, x, i, eps, grad) if ddim else ddpm_step(ddpm, x, i, eps, v, grad, noise())
        if blend:
            x_bg = ddpm.q_sample(source, i - 1, noise())                   # x_bg ~ q(x_{t−1} | x_0)
            x = x_fg * mask + x_bg * (1 - mask)                            # x_{t−1}
        else:
            x = x_fg
        if callback is not None:
            callback(step + 1, k, x0)
    if enforce_background:
        x0 = x0 * mask + source * (1 - mask)
    return x0.clamp(-1, 1)
