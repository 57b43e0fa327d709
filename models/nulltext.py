"""NULL-text inversion (Mokady et al.) over a host-agnostic protocol (the pixel DDPM's DDIM inversion is
models.ddpm.ddim_invert_pixel).

Protocol
--------
- ``eps(x_t, t, cond) -> eps``: batched noise prediction. ``x_t`` [B, C, H, W] (variance-preserving
  latent), ``t`` LongTensor [B] of training timesteps (0..T_train-1), ``cond`` the conditioning of B rows.
- ``DDIMSchedule``: the training ``alphas_cumprod`` and N inference steps.
- conditionings (models/cond.py): ``cond`` (the caption) and ``uncond`` (the null text ψ("")), each a context
  tensor [1|B, L, D] (SD1.x/SD2.x) or a ``Cond`` (context + SDXL's pooled/size vector y); ``eps`` gets the kind it
  was given. NULL-text optimises the context; a Cond's y stays the empty prompt's.

Step convention (diffusers' DDIMScheduler, timestep_spacing "leading", steps_offset=1,
set_alpha_to_one=False, which is what the reference NULL-text code uses):
  ratio = T_train // N,  t_k = (k−1)·ratio + 1 for k = 1..N  (N=50: 1, 21, …, 981),
  level a_k = ᾱ[t_k] for k ≥ 1 and a_0 = ᾱ[0] (not 1: set_alpha_to_one=False).
The trajectory is z_0 … z_N, z_k at noise level a_k; z_0 is the clean latent.
- Sampling step i (i = 0..N−1, first step i = 0) goes from level k = N−i to k−1 with ε(z_k, t_k).
- Inversion step k (k = 1..N) goes from level k−1 to k with ε(z_{k−1}, t_k) (the usual approximation:
  the destination's timestep, evaluated at the current latent).
Per-step null embeddings are indexed by the *sampling* step i (``nulls[0]`` is used at t_N).

Callbacks are ``callback(done, total, latent)`` (the engine's convention): ``latent`` is the current
trajectory latent (for a preview); raising from the callback aborts cleanly.

Gradients: the optimisers run under ``torch.inference_mode(False)`` + ``torch.enable_grad()`` and clone
their inputs, so they work when the host runs everything in inference mode (ComfyUI). The eps
network's own weights must not be inference tensors (see ``models.ddpm.thaw``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import cond as C
from .cond import Conditioning
from .ddpm import ddim_move as ddim_step  # the one DDIM formula, between the latent levels a_k
from .edit import grad_mode

log = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]

__all__ = ["DDIMSchedule", "ddim_step", "ddim_invert", "null_text_optimize", "null_text_optimize_global",
           "direct_inversion_offsets", "early_stop_threshold", "ddim_sample_cfg", "sdedit", "sdedit_start_step",
           "EpsFn", "Callback"]


# --------------------------------------------------------------------------------------------- schedule
def scaled_linear_alphas_cumprod(train_steps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's ᾱ: betas linear in sqrt space from beta_start to beta_end (float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@dataclass
class DDIMSchedule:
    """N DDIM steps over a training schedule (convention in the module docstring).

    ``alphas_cumprod`` defaults to SD's scaled_linear 0.00085–0.012 over 1000 steps; a host can pass its
    own (ComfyUI: ``1 / (model_sampling.sigmas.double() ** 2 + 1)``)."""
    steps: int = 50
    alphas_cumprod: torch.Tensor | None = None
    steps_offset: int = 1
    timesteps: list[int] = field(init=False)  # t_1..t_N (ascending)
    levels: list[float] = field(init=False)   # a_0..a_N

    def __post_init__(self):
        if self.alphas_cumprod is None:
            self.alphas_cumprod = scaled_linear_alphas_cumprod()
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        self.alphas_cumprod = ac
        train = ac.shape[0]
        if not 1 <= self.steps <= train:
            raise ValueError(f"DDIM steps = {self.steps}: it must be in 1..{train}")
        ratio = train // self.steps
        self.timesteps = [min((k - 1) * ratio + self.steps_offset, train - 1) for k in range(1, self.steps + 1)]
        self.levels = [float(ac[0])] + [float(ac[t]) for t in self.timesteps]

    def t(self, k: int, n: int, device) -> torch.Tensor:
        """Timestep t_k as a LongTensor [n] (k = 1..N)."""
        return torch.full((n,), self.timesteps[k - 1], dtype=torch.long, device=device)

    def q_sample(self, z0: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
        """z at level k: sqrt(a_k)·z0 + sqrt(1−a_k)·noise (k = 0 is level ᾱ[0], not exactly clean)."""
        a = self.levels[k]
        return math.sqrt(a) * z0 + math.sqrt(1 - a) * noise


# --------------------------------------------------------------------------------------------- helpers
def _ctx(c: Conditioning, n: int, name: str) -> Conditioning:
    if c.ndim != 3:
        raise ValueError(f"{name} must be [1|B, L, D] (a CONDITIONING tensor), got {tuple(c.shape)}")
    if c.shape[0] == n:
        return c
    if c.shape[0] == 1:
        return c.expand(n, -1, -1)
    raise ValueError(f"{name} has batch {c.shape[0]} for {n} latents: give 1 or {n}")


def _eps(eps: EpsFn, x: torch.Tensor, t: torch.Tensor, context: Conditioning) -> torch.Tensor:
    try:
        out = eps(x, t, context)
    except RuntimeError as e:
        if "Inference tensors cannot be saved for backward" in str(e):
            raise RuntimeError("the model's weights are inference tensors, so no gradient can flow "
                               "through it; re-create them outside inference mode first "
                               "(models.ddpm.thaw(module) inside torch.inference_mode(False))") from e
        raise
    if out.shape != x.shape:
        raise ValueError(f"eps returned {tuple(out.shape)} for an input of {tuple(x.shape)}")
    return out.to(x.dtype)


def _cfg(eps: EpsFn, z, t, cond, uncond, guidance):
    """Classifier-free guided ε: ε_u + w(ε_c − ε_u), one batched call; w = 1, or a null embedding equal to the
    condition (Negative-Prompt Inversion's reconstruction), runs cond only (ε_u = ε_c there)."""
    if guidance == 1 or C.equal(uncond, cond):
        return _eps(eps, z, t, cond)
    n = z.shape[0]
    out = _eps(eps, torch.cat([z, z]), torch.cat([t, t]), C.cat([uncond, cond]))
    e_u, e_c = out[:n], out[n:]
    return e_u + guidance * (e_c - e_u)


def _check_latents(schedule: DDIMSchedule, latents: Sequence[torch.Tensor]):
    if len(latents) != schedule.steps + 1:
        raise ValueError(f"{len(latents)} latents for a {schedule.steps}-step schedule: pass the whole "
                         f"ddim_invert trajectory z_0..z_N ({schedule.steps + 1} latents) with the same steps")
    if latents[0].shape[0] != 1:
        raise ValueError(f"NULL-text optimisation inverts one image at a time, got a batch of "
                         f"{latents[0].shape[0]}: call it once per image")


# --------------------------------------------------------------------------------------------- algorithms
@torch.no_grad()
def ddim_invert(eps: EpsFn, schedule: DDIMSchedule, z0: torch.Tensor, cond: Conditioning,
                callback: Callback | None = None) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prediction only (guidance 1): the pivot trajectory
    [z*_0, …, z*_N] (z*_0 = z0, z*_N the inverted noise)."""
    z = z0.detach().clone()
    cond = _ctx(cond.detach().clone(), z.shape[0], "cond")
    out = [z]
    n = schedule.steps
    for k in range(1, n + 1):
        e = _eps(eps, z, schedule.t(k, z.shape[0], z.device), cond)
        z = ddim_step(z, e, schedule.levels[k - 1], schedule.levels[k])
        out.append(z)
        if callback is not None:
            callback(k, n, z)
    return out


def early_stop_threshold(i: int, epsilon: float = 1e-5) -> float:
    """The loss below which ``null_text_optimize`` stops optimising sampling step i (the paper's ε + i·2e-5)."""
    return epsilon + i * 2e-5


def null_text_optimize(eps: EpsFn, schedule: DDIMSchedule, latents: Sequence[torch.Tensor],
                       cond: Conditioning, uncond: Conditioning, guidance: float = 7.5,
                       inner_steps: int = 10, lr: float = 1e-2, epsilon: float = 1e-5,
                       callback: Callback | None = None, losses: list | None = None) -> list[torch.Tensor]:
    """NULL-text optimisation (Algorithm 1 of the paper): one null embedding per sampling step.

    For sampling step i (from z̄_k, k = N−i; z̄_N = z*_N): Adam on a copy of the current null embedding,
    lr·(1 − i/100) (floored at lr·0.1 beyond 90 steps), at most ``inner_steps`` updates of
    ‖z*_{k−1} − DDIM(z̄_k, ∅, C)‖² (mean squared error), stopping early once the loss is below
    ε + i·2e-5; then z̄_{k−1} = DDIM(z̄_k, ∅_i, C) and ∅ carries over to step i+1.
    Returns [∅_0, …, ∅_{N−1}] (each of uncond's kind, context [1, L, D], float32, detached). ``losses``, if given, receives
    the last loss of each step. The optimisation runs in float32 whatever the model's dtype (latents,
    embeddings, loss and Adam state; ``eps`` may compute in half precision inside)."""
    _check_latents(schedule, latents)
    n = schedule.steps
    with grad_mode():
        target = [z.detach().float().clone() for z in latents]
        cond = _ctx(cond.detach().float().clone(), 1, "cond")
        base = _ctx(uncond.detach().clone(), 1, "uncond").float()  # its y (if any) is kept
        null = C.context(base)
        if null.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond {tuple(null.shape)} and cond {tuple(cond.shape)} differ in shape: "
                             "encode the empty prompt with the same text encoder")
        z = target[n]
        nulls = []
        for i in range(n):
            k = n - i
            t = schedule.t(k, 1, z.device)
            a_from, a_to = schedule.levels[k], schedule.levels[k - 1]
            with torch.no_grad():
                e_c = _eps(eps, z, t, cond.to(z.dtype))
            null = null.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([null], lr=lr * max(1.0 - i / 100.0, 0.1))
            loss_value = float("nan")
            for _ in range(inner_steps):
                e_u = _eps(eps, z, t, C.with_context(base, null).to(z.dtype))
                pred = ddim_step(z, e_u + guidance * (e_c - e_u), a_from, a_to)
                loss = F.mse_loss(pred.float(), target[k - 1].float())
                (grad,) = torch.autograd.grad(loss, [null])
                null.grad = grad
                opt.step()
                loss_value = loss.item()
                if loss_value < early_stop_threshold(i, epsilon):
                    break
            null = null.detach()
            nulls.append(C.with_context(base, null.clone()))
            if losses is not None:
                losses.append(loss_value)
            with torch.no_grad():
                e_u = _eps(eps, z, t, nulls[-1].to(z.dtype))
                z = ddim_step(z, e_u + guidance * (e_c - e_u), a_from, a_to)
            log.debug("null-text step %d/%d: loss %.3g", i + 1, n, loss_value)
            if callback is not None:
                callback(i + 1, n, z)
    return nulls


def null_text_optimize_global(eps: EpsFn, schedule: DDIMSchedule, latents: Sequence[torch.Tensor],
                              cond: Conditioning, uncond: Conditioning, guidance: float = 7.5,
                              epochs: int = 10, lr: float = 1e-2,
                              callback: Callback | None = None) -> torch.Tensor:
    """Global NULL-text inversion (supplement Algorithm 2): one null embedding for every step.

    ``epochs`` passes; each starts at z̄_N = z*_N and, for every sampling step, takes one Adam step
    (lr) on ‖z*_{k−1} − DDIM(z̄_k, ∅, C)‖², then sets z̄_{k−1} = DDIM(z̄_k, ∅, C) with the updated ∅.
    Same number of gradient steps as ``null_text_optimize`` with inner_steps = epochs (which may
    stop early). Returns ∅ (of uncond's kind, context [1, L, D], float32, detached); callback(done, epochs·N, z̄)."""
    _check_latents(schedule, latents)
    n = schedule.steps
    with grad_mode():
        target = [z.detach().float().clone() for z in latents]
        cond = _ctx(cond.detach().float().clone(), 1, "cond")
        base = _ctx(uncond.detach().clone(), 1, "uncond").float()  # its y (if any) is kept
        null = C.context(base).clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr)
        for j in range(epochs):
            z = target[n]
            for i in range(n):
                k = n - i
                t = schedule.t(k, 1, z.device)
                a_from, a_to = schedule.levels[k], schedule.levels[k - 1]
                with torch.no_grad():
                    e_c = _eps(eps, z, t, cond.to(z.dtype))
                e_u = _eps(eps, z, t, C.with_context(base, null).to(z.dtype))
                pred = ddim_step(z, e_u + guidance * (e_c - e_u), a_from, a_to)
                loss = F.mse_loss(pred.float(), target[k - 1].float())
                (grad,) = torch.autograd.grad(loss, [null])
                null.grad = grad
                opt.step()
                with torch.no_grad():
                    e_u = _eps(eps, z, t, C.with_context(base, null.detach()).to(z.dtype))
                    z = ddim_step(z, e_u + guidance * (e_c - e_u), a_from, a_to)
                if callback is not None:
                    callback(j * n + i + 1, epochs * n, z)
    return C.with_context(base, null.detach().clone())


@torch.no_grad()
def direct_inversion_offsets(eps: EpsFn, schedule: DDIMSchedule, latents: Sequence[torch.Tensor],
                             cond: Conditioning, uncond: Conditioning, guidance: float = 7.5,
                             callback: Callback | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Direct Inversion ("PnP Inversion", Ju et al.): no optimisation. For sampling step i (k = N−i) from the
    pivot z*_k, one guided DDIM step with the empty prompt's ``uncond`` gives z̄_{k−1}; the correction
    d_i = z*_{k−1} − z̄_{k−1} is stored and the source branch continues from z̄_{k−1} + d_i = z*_{k−1}, so
    sampling with the corrections added (``ddim_sample_cfg(..., corrections=…)``) stays on the inversion
    trajectory and reconstructs z*_0 up to float rounding.
    Returns ([d_0, …, d_{N−1}] (each [1, C, h, w], float32, detached), the corrected z̄_0)."""
    _check_latents(schedule, latents)
    n = schedule.steps
    target = [z.detach().float() for z in latents]
    cond = _ctx(cond.detach().float(), 1, "cond")
    uncond = _ctx(uncond.detach().float(), 1, "uncond")
    z = target[n]
    out = []
    for i in range(n):
        k = n - i
        e = _cfg(eps, z, schedule.t(k, 1, z.device), cond, uncond, guidance)
        prev = ddim_step(z, e, schedule.levels[k], schedule.levels[k - 1])
        d = target[k - 1] - prev
        out.append(d.clone())
        z = prev + d
        if callback is not None:
            callback(i + 1, n, z)
    return out, z


@torch.no_grad()
def ddim_sample_cfg(eps: EpsFn, schedule: DDIMSchedule, z: torch.Tensor, cond: Conditioning,
                    uncond: Conditioning | Sequence[Conditioning], guidance: float = 7.5,
                    start_step: int = 0, controller=None, callback: Callback | None = None,
                    corrections: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling with classifier-free guidance, from sampling step ``start_step``
    (z at level N − start_step; 0 = from z_N) down to z_0.

    ``uncond``: one null embedding [1|B, L, D] for all steps, or the per-step list from
    ``null_text_optimize`` (indexed by the absolute sampling step, so it must have N entries).
    ``controller`` (models.p2p.AttentionControl, optional): told the step before each UNet call
    (``begin_step``; the batched call is [uncond rows, cond rows], i.e. cond_or_uncond = [1, 0]) and
    given the latents after it (``end_step``, local blending). For prompt-to-prompt pass the batch
    [source, edit…] with cond [B, L, D].
    ``corrections`` (Direct Inversion, optional): N tensors [b, C, h, w] from ``direct_inversion_offsets``,
    indexed by the absolute sampling step; the i-th is added to the first b rows (the source) after step i,
    before the controller's ``end_step`` (so local blending sees the corrected source)."""
    n = schedule.steps
    if not 0 <= start_step <= n:
        raise ValueError(f"start_step = {start_step}: it must be in 0..{n}")
    per_step = isinstance(uncond, (list, tuple))
    if per_step and len(uncond) != n:
        raise ValueError(f"{len(uncond)} null embeddings for a {n}-step schedule: the list from "
                         "null_text_optimize must come from the same number of steps")
    if corrections is not None and len(corrections) != n:
        raise ValueError(f"{len(corrections)} corrections for a {n}-step schedule: they must come from "
                         "direct_inversion_offsets with the same number of steps")
    b = z.shape[0]
    cond = _ctx(cond, b, "cond").to(z.device, z.dtype)
    if controller is not None:
        controller.reset()
    for i in range(start_step, n):
        k = n - i
        u = _ctx(uncond[i] if per_step else uncond, b, "uncond").to(z.device, z.dtype)
        if controller is not None:
            controller.begin_step(i, n, cond_or_uncond=[0] if guidance == 1 else [1, 0],
                                  latent_shape=tuple(z.shape[-2:]))
        e = _cfg(eps, z, schedule.t(k, b, z.device), cond, u, guidance)
        z = ddim_step(z, e, schedule.levels[k], schedule.levels[k - 1])
        if corrections is not None:
            d = corrections[i].to(z.device, z.dtype)
            z = torch.cat([z[:d.shape[0]] + d, z[d.shape[0]:]])
        if controller is not None:
            z = controller.end_step(z)
        if callback is not None:
            callback(i - start_step + 1, n - start_step, z)
    return z


def sdedit_start_step(schedule: DDIMSchedule, t0: float) -> int:
    """The sampling step SDEdit starts at for strength t0 in (0, 1] (1 = from pure noise level N)."""
    if not 0 < t0 <= 1:
        raise ValueError(f"SDEdit t0 = {t0}: it must be in (0, 1]")
    return schedule.steps - max(1, round(t0 * schedule.steps))


@torch.no_grad()
def sdedit(eps: EpsFn, schedule: DDIMSchedule, z0: torch.Tensor, cond: Conditioning,
           uncond: Conditioning | Sequence[Conditioning], t0: float, guidance: float = 7.5,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           start_latent: torch.Tensor | None = None, controller=None,
           callback: Callback | None = None, corrections: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """SDEdit from t0: noise z0 to level k = round(t0·N) (fresh noise, or ``start_latent``, e.g. the
    inverted z*_k = latents[k]), then DDIM with guidance towards ``cond``. With the per-step null
    embeddings of the inversion as ``uncond`` this is the supplement's "SDEdit after NULL-text
    inversion"; with ψ("") it is plain SDEdit."""
    start = sdedit_start_step(schedule, t0)
    k = schedule.steps - start
    if start_latent is None:
        if noise is None:
            noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        start_latent = schedule.q_sample(z0, k, noise)
    return ddim_sample_cfg(eps, schedule, start_latent, cond, uncond, guidance, start, controller, callback,
                           corrections)
