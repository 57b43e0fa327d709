"""guided-diffusion DDPMs: the UNet config read off the state dict, and the sampling schedule.

The schedule (``space_timesteps`` / ``SpacedDiffusion``) comes from guided-diffusion itself; the
per-step numbers are then kept as torch tensors on the model's device so that a step does no
numpy→device copy (guided-diffusion's ``_extract_into_tensor`` does one per call).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, fields

import warnings

import numpy as np
import torch

with warnings.catch_warnings():  # guided_diffusion.nn uses the deprecated torch.cuda.amp decorators
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps
    from guided_diffusion.unet import UNetModel

from .checkpoint import CheckpointError, describe, read_state_dict

log = logging.getLogger(__name__)

# channel_mult of each published resolution (guided-diffusion script_util.create_model)
SIZE_BY_MULT = {(0.5, 1, 1, 2, 2, 4, 4): 512, (1, 1, 2, 2, 4, 4): 256, (1, 1, 2, 3, 4): 128, (1, 2, 3, 4): 64}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def infer_unet_config(sd: dict[str, torch.Tensor], image_size: int | None = None) -> dict:
    """UNetModel kwargs from a guided-diffusion state dict (raises CheckpointError if it is none)."""
    if "time_embed.0.weight" not in sd or "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise CheckpointError(f"this is {describe(sd)}, not a guided-diffusion UNet "
                              "(expected e.g. 256x256_diffusion_uncond.pt)")
    ch = sd["time_embed.0.weight"].shape[1]
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    n_out = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))

    def sub(prefix):  # sub-module indices of one block
        return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})

    def is_attn(prefix):
        return f"{prefix}qkv.weight" in sd

    # an output block ends with an upsampler (ResBlock or conv) at every level but the last
    ups = sum(1 for b in range(n_out) if any(
        not is_attn(f"output_blocks.{b}.{j}.") for j in sub(f"output_blocks.{b}.") if j > 0))
    levels = ups + 1
    if n_in != n_out or n_out % levels:
        raise CheckpointError("unknown guided-diffusion UNet layout "
                              f"({n_in} input blocks, {n_out} output blocks)")
    res = n_out // levels - 1
    mult, attn = [], []
    for level in range(levels):
        b = 1 + level * (res + 1)
        mult.append(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] / ch)
        if is_attn(f"input_blocks.{b}.1."):
            attn.append(2 ** level)
    mult = tuple(int(m) if float(m).is_integer() else m for m in mult)
    updown = levels > 1 and f"input_blocks.{res + 1}.0.in_layers.0.weight" in sd
    scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * sd[
        "input_blocks.1.0.out_layers.3.weight"].shape[0]
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    size = image_size or SIZE_BY_MULT.get(mult)
    if size is None:
        raise CheckpointError(f"unknown architecture: channel_mult {mult} is none of the published "
                              "guided-diffusion models (64, 128, 256 or 512 px), so its image size is "
                              "unknown; expected e.g. 256x256_diffusion_uncond.pt (from Python: pass "
                              "image_size to load_ddpm)")
    # Head layout is not stored in the weights: the published 128x128 model uses 4 heads,
    # every other published model 64 channels per head.
    heads = dict(num_heads=4, num_head_channels=-1) if (size == 128 and ch == 256) else \
        dict(num_heads=1, num_head_channels=64)
    return dict(image_size=size, in_channels=in_ch, model_channels=ch, out_channels=out_ch,
                num_res_blocks=res, attention_resolutions=tuple(attn), channel_mult=mult,
                num_classes=num_classes, use_scale_shift_norm=scale_shift, resblock_updown=updown,
                use_new_attention_order=(size == 64), dropout=0.0, **heads)


def _sqrt(a):
    return a.sqrt() if torch.is_tensor(a) else math.sqrt(a)


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from, a_to, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The one DDIM update (eta 0) of the pack, either direction: from noise level ``a_from`` (ᾱ) to
    ``a_to`` along ε. x̂0 = (x − sqrt(1−a_from)·ε) / sqrt(a_from), or ``x0`` when the caller has it
    (the pixel sampler's precomputed coefficients); then sqrt(a_to)·x̂0 + sqrt(1−a_to)·ε.
    Levels are floats (the latent ``nulltext.DDIMSchedule``) or 0-dim tensors (the pixel ``Schedule``)."""
    if x0 is None:
        x0 = (x - _sqrt(1 - a_from) * eps) / _sqrt(a_from)
    return _sqrt(a_to) * x0 + _sqrt(1 - a_to) * eps


@dataclass
class Schedule:
    """The respaced pixel schedule of a guided-diffusion DDPM, one float32 tensor per quantity, indexed
    by the spaced step i (0 = least noise). Built once from guided-diffusion's SpacedDiffusion
    (``from_diffusion``) so that a step does no numpy→device copy; the math matches guided-diffusion's
    ``q_sample`` / ``p_mean_variance`` / ``ddim_sample``."""
    timestep_map: torch.Tensor  # the timestep the UNet sees (rescaled to 0..1000)
    ac: torch.Tensor            # ᾱ_i
    ac_prev: torch.Tensor       # ᾱ_{i−1} (1 at i = 0)
    sqrt_ac: torch.Tensor
    sqrt_1m_ac: torch.Tensor    # sqrt(1 − ᾱ_i), also the guidance loss's x_in factor
    sqrt_recip_ac: torch.Tensor
    sqrt_recipm1_ac: torch.Tensor
    coef1: torch.Tensor         # posterior mean coefficients
    coef2: torch.Tensor
    post_log_var: torch.Tensor  # posterior log-variance (clipped)
    log_betas: torch.Tensor
    fixed_log_var: torch.Tensor  # FIXED_LARGE log-variance (models without learned sigma)

    @classmethod
    def from_diffusion(cls, d: SpacedDiffusion, device="cpu") -> "Schedule":
        f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)  # noqa: E731
        t = torch.as_tensor(d.timestep_map, dtype=torch.float32)
        if d.rescale_timesteps:
            t = t * (1000.0 / d.original_num_steps)
        with torch.inference_mode(False):
            return cls(timestep_map=t, ac=f(d.alphas_cumprod), ac_prev=f(d.alphas_cumprod_prev),
                       sqrt_ac=f(d.sqrt_alphas_cumprod), sqrt_1m_ac=f(d.sqrt_one_minus_alphas_cumprod),
                       sqrt_recip_ac=f(d.sqrt_recip_alphas_cumprod),
                       sqrt_recipm1_ac=f(d.sqrt_recipm1_alphas_cumprod),
                       coef1=f(d.posterior_mean_coef1), coef2=f(d.posterior_mean_coef2),
                       post_log_var=f(d.posterior_log_variance_clipped), log_betas=f(np.log(d.betas)),
                       fixed_log_var=f(np.log(np.append(d.posterior_variance[1], d.betas[1:])))).to(device)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def _map(self, fn) -> "Schedule":
        with torch.inference_mode(False):
            return Schedule(*map(fn, self.tensors()))

    def to(self, device) -> "Schedule":
        return self._map(lambda v: v.to(device))

    def thaw(self) -> "Schedule":
        """A copy usable by autograd (a host may have made the tensors in inference mode)."""
        return self._map(lambda v: v.clone() if v.is_inference() else v)

    def timestep(self, i: int, n: int) -> torch.Tensor:
        """The timestep the UNet sees at spaced index i, for a batch of n (guided-diffusion's _WrappedModel)."""
        return self.timestep_map[i].expand(n)

    def q_sample(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x_i ~ N(sqrt(ᾱ_i) x0, (1-ᾱ_i) I); i = -1 means clean."""
        if i < 0:
            return x0
        return self.sqrt_ac[i] * x0 + self.sqrt_1m_ac[i] * noise

    def pred_xstart(self, x: torch.Tensor, i: int, eps: torch.Tensor) -> torch.Tensor:
        """x̂0 from ε (eq. 5 of the paper)."""
        return self.sqrt_recip_ac[i] * x - self.sqrt_recipm1_ac[i] * eps

    def posterior(self, x: torch.Tensor, i: int, x0: torch.Tensor, var_values: torch.Tensor | None):
        """Mean and log-variance of p(x_{i-1} | x_i) (guided-diffusion p_mean_variance)."""
        mean = self.coef1[i] * x0 + self.coef2[i] * x
        if var_values is None:
            return mean, self.fixed_log_var[i].expand_as(x)
        frac = (var_values + 1) / 2
        return mean, frac * self.log_betas[i] + (1 - frac) * self.post_log_var[i]


@dataclass
class DDPM:
    """A guided-diffusion UNet plus its (respaced) ``Schedule`` on the model's device."""
    model: UNetModel
    diffusion: SpacedDiffusion
    config: dict
    precision: str = "fp32"
    path: str = ""
    schedule: Schedule | None = None
    noise_schedule: str = "linear"

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = Schedule.from_diffusion(self.diffusion, self.device)

    def respaced(self, respacing: str, precision: str | None = None) -> "DDPM":
        """Another schedule/precision over the same (shared) UNet weights."""
        diffusion = make_diffusion(respacing, noise_schedule=self.noise_schedule, learn_sigma=self.learn_sigma)
        return DDPM(self.model, diffusion, self.config, precision or self.precision, self.path,
                    noise_schedule=self.noise_schedule)

    def thaw(self) -> "DDPM":
        """Make weights and schedule usable by autograd after a host touched them in inference mode."""
        thaw(self.model)
        self.schedule = self.schedule.thaw()
        return self

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def num_classes(self) -> int | None:
        return self.config["num_classes"]

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def learn_sigma(self) -> bool:
        return self.config["out_channels"] == 2 * self.config["in_channels"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "DDPM":
        with torch.inference_mode(False):
            self.model.to(device)
        self.schedule = self.schedule.to(device)
        return self

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def eps_and_var(self, x: torch.Tensor, i: int, y: torch.Tensor | None = None):
        """One UNet forward: (eps, variance-interpolation values or None), both float32."""
        with self.autocast():
            out = self.model(x, self.schedule.timestep(i, x.shape[0]), y=y).float()
        if self.learn_sigma:
            return out.split(x.shape[1], dim=1)
        return out, None

    # the schedule's math, where the algorithms read it (models/blended.py)
    def q_sample(self, x0, i, noise):
        return self.schedule.q_sample(x0, i, noise)

    def pred_xstart(self, x, i, eps):
        return self.schedule.pred_xstart(x, i, eps)

    def posterior(self, x, i, x0, var_values):
        return self.schedule.posterior(x, i, x0, var_values)


@torch.no_grad()
def ddim_invert_pixel(ddpm: DDPM, x0: torch.Tensor, k: int, y: torch.Tensor | None = None,
                      callback=None) -> torch.Tensor:
    """Deterministic DDIM inversion (eta 0) of the pixel DDPM: x0 [B, 3, S, S] in [−1, 1] → x at spaced
    step k−1 (level ᾱ[k−1]), the start of k sampling steps instead of q_sample
    (``edit(..., start="ddim_inversion")``).

    Step i (0..k−1) goes from level ᾱ_prev[i] (ᾱ_prev[0] = 1, the clean image) to ᾱ[i] with ε from one
    UNet call at spaced timestep i: guided-diffusion's ddim_reverse_sample math, with the destination's
    timestep (as DDIM inversion for SD does). ``callback(done, k, x)`` after each step."""
    if not 1 <= k <= ddpm.num_steps:
        raise ValueError(f"k = {k}: it must be in 1..{ddpm.num_steps} (the model's respaced steps)")
    s = ddpm.schedule
    x = x0.detach().clone().float().to(ddpm.device)
    for i in range(k):
        eps, _ = ddpm.eps_and_var(x, i, y)
        x = ddim_move(x, eps, s.ac_prev[i], s.ac[i])
        if callback is not None:
            callback(i + 1, k, x)
    return x


def thaw(module: torch.nn.Module) -> torch.nn.Module:
    """Replace inference tensors (left by a host that moved the model in inference mode) by
    normal ones, so that autograd can save them for backward."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
    return module


def thaw_tensors(d: dict) -> dict:
    with torch.inference_mode(False):
        return {k: v.clone() if v.is_inference() else v for k, v in d.items()}


def respaced_timesteps(respacing: str, steps: int = 1000, name: str = "timestep respacing") -> set[int]:
    """The diffusion steps a respacing keeps (guided-diffusion's ``space_timesteps``: '100', 'ddim50', '10,10,10');
    ValueError naming ``name`` (the caller's word for the setting) if it is not valid or keeps no step."""
    respacing = str(respacing).strip() or str(steps)
    try:
        use = space_timesteps(steps, respacing if respacing.startswith("ddim") else
                              [int(c) for c in respacing.split(",")])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} {respacing!r} is not valid ({e}); use e.g. '100', "
                         "'ddim50' or '10,10,10'") from None
    if not use or (not respacing.startswith("ddim") and any(int(c) < 0 for c in respacing.split(","))):
        raise ValueError(f"{name} {respacing!r} keeps no denoising step: give at least 1 "
                         f"(and at most {steps}), e.g. '100', 'ddim50' or '10,10,10'")
    return use


def count_steps(respacing: str, steps: int = 1000, name: str = "timestep respacing") -> int:
    """The number of denoising steps a respacing keeps (checked as ``respaced_timesteps``), without a model."""
    return len(respaced_timesteps(respacing, steps, name))


def make_diffusion(respacing: str = "100", steps: int = 1000, noise_schedule: str = "linear",
                   learn_sigma: bool = True) -> SpacedDiffusion:
    use = respaced_timesteps(respacing, steps)
    return SpacedDiffusion(
        use_timesteps=use, betas=gd.get_named_beta_schedule(noise_schedule, steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE, rescale_timesteps=True)


def load_ddpm(path: str, respacing: str = "100", precision: str = "fp32", device="cpu",
              image_size: int | None = None, noise_schedule: str | None = None) -> DDPM:
    """Load a guided-diffusion checkpoint (.pt or .safetensors); config inferred from the weights."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {list(PRECISIONS)}")
    sd = read_state_dict(path, "a guided-diffusion UNet checkpoint such as 256x256_diffusion_uncond.pt")
    try:
        cfg = infer_unet_config(sd, image_size)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.inference_mode(False):
        model = UNetModel(**cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: the weights do not fit the inferred UNet config {cfg} "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.eval().requires_grad_(False).to(device)
    schedule = noise_schedule or ("cosine" if cfg["image_size"] == 64 else "linear")
    diffusion = make_diffusion(respacing, noise_schedule=schedule,
                               learn_sigma=cfg["out_channels"] == 2 * cfg["in_channels"])
    log.info("loaded %s: %s, %d steps (%s), %s", path, {k: cfg[k] for k in
             ("image_size", "model_channels", "channel_mult", "num_classes")},
             diffusion.num_timesteps, respacing, precision)
    return DDPM(model, diffusion, cfg, precision, path, noise_schedule=schedule)
