"""Inversion of a real image as a whole, over the core (models/nulltext.py, models/p2p.py): the ``Inversion``
record and its file format, and the runs made from it — ``invert`` (DDIM inversion, then one of ``METHODS``,
then the reconstruction), a prompt-to-prompt ``edit``, ``sdedit_run`` and the SDEdit points of a fidelity sweep
(``sdedit_runs``, measured by models/fidelity.py).

Methods (``invert(method=…)``; every edit uses what the method stored):
- "null-text": NULL-text inversion, one optimised null embedding per step (Mokady et al.);
- "null-text global": one optimised null embedding for all steps (their supplement's Algorithm 2);
- "negative-prompt": Negative-Prompt Inversion (Miyake et al.): no optimisation, the caption's own embedding is
  the null embedding at every step (``nulls`` = [cond]);
- "direct": Direct Inversion / PnP Inversion (Ju et al.): no optimisation, the empty prompt's embedding, and per
  step the correction z*_{k−1} − z̄_{k−1} (``corrections``) added back to the source branch, so the source is
  reconstructed exactly.

Pure torch, no host. ``model`` is any object with
- ``eps(x_t, t, cond)``: the core's noise prediction (models/nulltext.py),
- ``device``: where its latents are computed,
- ``alphas_cumprod``: its training ᾱ (float64, CPU);
host/sd.py's ``SDModel`` makes one of ComfyUI's MODEL. Latents are in the model's latent space; conditionings
(models/cond.py: a context [1, L, D], or a ``Cond`` with SDXL's vector y; on the CPU, as an ``Inversion`` keeps
them) are moved to the model's device here.

Callbacks, in the spirit of diffusers' ``callback_on_step_end``: ``callback(done, total, latent)`` after every
step of a run, ``total`` counting every stage of it and ``latent`` the current one (for a preview); progress,
previews and cancelling (raise from the callback) are the caller's.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cond as C
from . import fidelity as fid
from . import nulltext as nt
from . import p2p
from .cond import Cond, Conditioning

log = logging.getLogger(__name__)

FORMAT = "blended_diffusion.nulltext_inversion"
FORMAT_VERSION = "2"  # 2: method, corrections, model family, conditioning kind; version 1 files still load
Y_VERSION = "3"  # 3: with the conditioning vectors y (SDXL); written only for inversions that have them
READ_VERSIONS = ("1", "2", "3")
SDEDIT_STARTS = ("inversion", "random noise")
UNKNOWN = "unknown"  # files from before the model family was recorded
METHODS = ("null-text", "null-text global", "negative-prompt", "direct")
OPTIMISING = ("null-text", "null-text global")


# --------------------------------------------------------------------------------------------- the record
@dataclass
class Inversion:
    """One inverted image (the nodes' BD_INVERSION).

    latents: the pivot trajectory z*_0 … z*_N ([1, 4, h, w] each, float32, CPU, in the model's latent
    space); nulls: the N per-step null embeddings (sampling-step order), or one for all steps (global);
    cond / uncond: the caption's and the empty prompt's conditionings (context [1, L, D], or a ``Cond`` with
    y [1, A]; the nulls are of the same kind); alphas_cumprod: the training
    schedule the trajectory was made on; source: the image that was encoded (as the host gave it; ComfyUI:
    IMAGE [1, H, W, 3]); info: the inversion's measurements and timings; method: one of ``METHODS``;
    corrections: Direct Inversion's N per-step corrections of the source branch ([1, 4, h, w] each), else [];
    family / cond_kind: the model family (the host's ``model.family``, e.g. "SD15/EPS") and the kind of its
    conditioning (``model.cond_kind``, e.g. "context") it was made with; "unknown" when the model or file did not
    say (then not checked)."""
    latents: list
    nulls: list
    cond: Conditioning
    uncond: Conditioning
    alphas_cumprod: torch.Tensor
    prompt: str
    guidance: float
    source: torch.Tensor
    is_global: bool = False
    inner_steps: int = 10
    losses: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    method: str = "null-text"
    corrections: list = field(default_factory=list)
    family: str = UNKNOWN
    cond_kind: str = UNKNOWN

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"inversion method {self.method!r} unknown: use one of {list(METHODS)}")
        if self.corrections and len(self.corrections) != self.steps:
            raise ValueError(f"{len(self.corrections)} corrections for a {self.steps}-step inversion")

    @property
    def steps(self) -> int:
        return len(self.latents) - 1

    def schedule(self) -> nt.DDIMSchedule:
        return nt.DDIMSchedule(self.steps, alphas_cumprod=self.alphas_cumprod)

    def step_nulls(self) -> list:
        """One null embedding per sampling step (the global one repeated)."""
        return list(self.nulls) if len(self.nulls) == self.steps else [self.nulls[0]] * self.steps

    def step_corrections(self, device=None) -> list | None:
        """Direct Inversion's per-step corrections of the source row (on ``device``), else None."""
        return [d.to(device) for d in self.corrections] if self.corrections else None

    def check_model(self, model) -> None:
        """ValueError unless ``model`` is of the family, conditioning kind and noise schedule this inversion was made
        with."""
        for attr, what in (("family", "model family"), ("cond_kind", "conditioning")):
            mine, theirs = getattr(self, attr), str(getattr(model, attr, UNKNOWN))
            if UNKNOWN not in (mine, theirs) and mine != theirs:
                raise ValueError(f"this inversion was made with a {self.family} model ({self.cond_kind} "
                                 f"conditioning), but this MODEL's {what} is {theirs}: edit with the checkpoint "
                                 "you inverted with, or invert the image again with this one")
        ac = model.alphas_cumprod
        if ac.shape != self.alphas_cumprod.shape or \
                not torch.allclose(ac, self.alphas_cumprod, rtol=1e-4, atol=1e-6):
            raise ValueError("this MODEL's noise schedule differs from the one the inversion was made with: "
                             "edit with the checkpoint you inverted with")

    def check_guidance(self, guidance: float) -> None:
        """Warn when editing at another guidance than the null embeddings were optimised for."""
        if abs(guidance - self.guidance) > 1e-6:
            log.warning("guidance %.2f differs from the inversion's %.2f: the null embeddings were optimised "
                        "for %.2f, so the unedited parts will drift", guidance, self.guidance, self.guidance)

    def report(self) -> dict:
        """The inversion's parameters, per-step losses, measurements and timings (JSON-ready)."""
        return {"prompt": self.prompt, "method": self.method, "family": self.family, "steps": self.steps, "guidance": self.guidance,
                "global_null": self.is_global, "inner_steps": self.inner_steps, "final_losses": self.losses,
                **self.info}

    # ---- file format: tensors + JSON metadata in one .safetensors
    def to_file(self, path: Path) -> None:
        from safetensors.torch import save_file
        nulls = C.cat(self.nulls)
        tensors = {"latents": torch.cat(self.latents), "alphas_cumprod": self.alphas_cumprod, "source": self.source}
        for name, c in (("nulls", nulls), ("cond", self.cond), ("uncond", self.uncond)):
            tensors[name] = C.context(c)
            if isinstance(c, Cond) and c.y is not None:
                tensors[name + "_y"] = c.y
        if self.corrections:
            tensors["corrections"] = torch.cat(self.corrections)
        with torch.inference_mode(False):
            tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "version": Y_VERSION if "cond_y" in tensors else FORMAT_VERSION, "prompt": self.prompt, "steps": str(self.steps),
                "guidance": repr(float(self.guidance)), "global": json.dumps(self.is_global),
                "inner_steps": str(self.inner_steps), "losses": json.dumps(self.losses),
                "info": json.dumps(self.info), "method": self.method, "family": self.family,
                "cond_kind": self.cond_kind}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def from_file(cls, path: Path) -> "Inversion":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable .safetensors file ({e}): save it again with "
                             "Save Inversion") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a NULL-text inversion saved by Save Inversion "
                             f"(metadata format = {meta.get('format')!r})")
        if meta.get("version") not in READ_VERSIONS:
            raise ValueError(f"{path} has inversion format version {meta.get('version')!r}; this pack reads "
                             f"versions {', '.join(READ_VERSIONS)}: invert the image again")
        missing = {"latents", "nulls", "cond", "uncond", "alphas_cumprod", "source"} - set(t)
        ys = {k for k in ("nulls_y", "cond_y", "uncond_y") if k in t}
        if ys and len(ys) != 3:
            missing |= {"nulls_y", "cond_y", "uncond_y"} - ys
        if missing:
            raise ValueError(f"{path} lacks the tensors {sorted(missing)}: invert the image again")
        steps = int(meta["steps"])
        is_global = json.loads(meta["global"])
        lat, nulls = t["latents"], t["nulls"]
        # version 1 knew NULL-text only
        method = meta.get("method", "null-text global" if is_global and int(meta.get("inner_steps", 10)) > 0
                          else "null-text")
        if method not in METHODS:
            raise ValueError(f"{path} was made with the inversion method {method!r}, which this pack does not "
                             f"know ({', '.join(METHODS)}): invert the image again")
        corr = t.get("corrections")
        if lat.ndim != 4 or lat.shape[0] != steps + 1 or nulls.ndim != 3 or \
                nulls.shape[0] != (1 if is_global else steps) or nulls.shape[1:] != t["cond"].shape[1:] or \
                (method == "direct") != (corr is not None) or \
                (corr is not None and tuple(corr.shape) != (steps, *lat.shape[1:])):
            raise ValueError(f"{path}: tensor shapes do not fit a {steps}-step {method} inversion "
                             f"(latents {tuple(lat.shape)}, nulls {tuple(nulls.shape)}, corrections "
                             f"{None if corr is None else tuple(corr.shape)}): the file is damaged")
        if ys:
            if any(t[k].ndim != 2 or t[k].shape[0] != t[k[:-2]].shape[0] for k in ys):
                raise ValueError(f"{path}: the conditioning vectors do not fit the contexts: the file is damaged")
            nulls, cond, uncond = (Cond(t[k], t[k + "_y"]).float() for k in ("nulls", "cond", "uncond"))
        else:
            cond, uncond = t["cond"].float(), t["uncond"].float()
        return cls(latents=list(lat.float().split(1)), nulls=list(nulls.float().split(1)),
                   cond=cond, uncond=uncond,
                   alphas_cumprod=t["alphas_cumprod"].double(), prompt=meta.get("prompt", ""),
                   guidance=float(meta["guidance"]), source=t["source"].float(), is_global=is_global,
                   inner_steps=int(meta.get("inner_steps", 10)), losses=json.loads(meta.get("losses", "[]")),
                   info=json.loads(meta.get("info", "{}")), method=method,
                   corrections=[] if corr is None else list(corr.float().split(1)),
                   family=meta.get("family", UNKNOWN), cond_kind=meta.get("cond_kind", UNKNOWN))


# --------------------------------------------------------------------------------------------- inversion
def resolve_method(method: str = "null-text", global_null: bool = False) -> str:
    """The method ``invert`` runs: ``global_null`` (the older switch) turns "null-text" into "null-text global";
    ValueError for an unknown method or global_null with a method that optimises nothing."""
    if method not in METHODS:
        raise ValueError(f"inversion method {method!r} unknown: use one of {list(METHODS)}")
    if global_null:
        if method not in OPTIMISING:
            raise ValueError(f"global_null applies to NULL-text only, not to method {method!r}: switch "
                             "global_null off (or pick method 'null-text global')")
        return "null-text global"
    return method


def invert_steps(steps: int, inner_steps: int = 10, global_null: bool = False, method: str = "null-text") -> int:
    """The ``total`` of ``invert``'s callback: DDIM inversion, the method's pass, and reconstruction steps."""
    method = resolve_method(method, global_null)
    if method == "negative-prompt":
        return 2 * steps
    if method == "direct":
        return 2 * steps  # the correction pass is the reconstruction
    if inner_steps <= 0:
        return 2 * steps
    return steps + (inner_steps * steps if method == "null-text global" else steps) + steps


def convergence(losses: Sequence[float], epsilon: float = 1e-5) -> dict:
    """Which NULL-text steps ended above their early-stop threshold (``nt.early_stop_threshold``)."""
    bad = [i for i, x in enumerate(losses) if not x < nt.early_stop_threshold(i, epsilon)]
    return {"not_converged_steps": len(bad), "not_converged_at": bad,
            "worst_loss": max(losses) if losses else None}


def invert(model, z0: torch.Tensor, cond: Conditioning, uncond: Conditioning, *, prompt: str, source: torch.Tensor,
           steps: int = 50, guidance: float = 7.5, inner_steps: int = 10, global_null: bool = False,
           method: str = "null-text", callback: nt.Callback | None = None) -> tuple[Inversion, torch.Tensor]:
    """Invert the clean latent ``z0`` [1, C, h, w] captioned by ``cond`` (``uncond``: the empty prompt's context):
    DDIM inversion at guidance 1 (the pivots), then the ``method`` (``METHODS``; ``global_null`` = the older
    way to ask for "null-text global"):
    - NULL-text optimisation at ``guidance`` (per step, or one global null embedding; ``inner_steps`` = 0: none,
      the empty prompt's embedding is kept as the global one), in float32 whatever the model's dtype; steps
      whose final loss stays above the early-stop threshold are counted in ``info`` and logged as a warning;
    - "negative-prompt": the caption's embedding as the null embedding, nothing optimised;
    - "direct": the per-step corrections of the source branch (nothing optimised);
    then the reconstruction from z*_N with what the method stored.

    Returns (the inversion, whose ``info`` holds the latent reconstruction error and each stage's seconds; the
    reconstructed latent on the model's device)."""
    method = resolve_method(method, global_null)
    sched = nt.DDIMSchedule(steps, alphas_cumprod=model.alphas_cumprod)
    with torch.inference_mode(False):
        z0 = z0.detach().float().clone().to(model.device)
        c, u = cond.float().to(model.device), uncond.float().to(model.device)
    total = invert_steps(steps, inner_steps, method=method)

    def stage(offset: int):
        return None if callback is None else lambda done, _n, z: callback(offset + done, total, z)

    times, losses, corrections, info = {}, [], [], {}
    is_global = method != "null-text" or inner_steps == 0
    t = time.perf_counter()
    latents = nt.ddim_invert(model.eps, sched, z0, c, callback=stage(0))
    times["ddim_inversion_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = None
    if method == "negative-prompt":
        nulls = [c]
    elif method == "direct":
        nulls = [u]
        corrections, rec = nt.direct_inversion_offsets(model.eps, sched, latents, c, u, guidance,
                                                       callback=stage(steps))
    elif inner_steps == 0:
        nulls = [u]
    elif method == "null-text global":
        nulls = [nt.null_text_optimize_global(model.eps, sched, latents, c, u, guidance, epochs=inner_steps,
                                              callback=stage(steps))]
    else:
        nulls = nt.null_text_optimize(model.eps, sched, latents, c, u, guidance, inner_steps,
                                      callback=stage(steps), losses=losses)
        info = convergence(losses)
        if info["not_converged_steps"]:
            info["convergence"] = (f"NULL-text did not converge at {info['not_converged_steps']} of {steps} steps "
                                   f"(final loss above the early-stop threshold; worst {info['worst_loss']:.3g}): "
                                   "the reconstruction may drift; raise inner_steps, or use method 'direct' for "
                                   "an exact reconstruction")
            log.warning("%s", info["convergence"])
    times["inversion_method_s" if method not in OPTIMISING else "null_text_s"] = time.perf_counter() - t
    if rec is None:
        t = time.perf_counter()
        step_nulls = nulls if len(nulls) == steps else nulls * steps
        rec = nt.ddim_sample_cfg(model.eps, sched, latents[-1], c, step_nulls, guidance,
                                 callback=stage(total - steps))
        times["reconstruction_s"] = time.perf_counter() - t
    with torch.inference_mode(False):
        inv = Inversion(latents=[z.detach().float().cpu().clone() for z in latents],
                        nulls=[n.detach().float().cpu().clone() for n in nulls], cond=cond.float(),
                        uncond=uncond.float(), alphas_cumprod=model.alphas_cumprod.clone(), prompt=prompt,
                        guidance=float(guidance), source=source.detach().float().cpu().clone(),
                        is_global=bool(is_global), inner_steps=int(inner_steps), losses=[float(x) for x in losses],
                        method=method, corrections=[d.detach().float().cpu().clone() for d in corrections],
                        family=str(getattr(model, "family", UNKNOWN)),
                        cond_kind=str(getattr(model, "cond_kind", UNKNOWN)))
    inv.info = {"latent_mse": float(F.mse_loss(rec.float().cpu(), latents[0].float().cpu())), **info,
                **{k: round(v, 3) for k, v in times.items()}}
    return inv, rec


# --------------------------------------------------------------------------------------------- editing
def split_words(text: str) -> list[str]:
    """"cat, dog hat" → ["cat", "dog", "hat"]."""
    return [w for w in re.split(r"[,\s]+", (text or "").strip()) if w]


def word_windows(text: str) -> dict[str, tuple[float, float]]:
    """"dog: 0.4, hat: 0.2-0.6" → {"dog": (0, 0.4), "hat": (0.2, 0.6)}."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        word, sep, val = item.rpartition(":")
        word = word.strip()
        try:
            lo, _, hi = val.strip().partition("-")
            win = (float(lo), float(hi)) if hi else (0.0, float(lo))
        except ValueError:
            win = None
        if not sep or not word or win is None or not 0 <= win[0] <= win[1] <= 1:
            raise ValueError(f"word_replace_steps item {item!r}: write \"word: fraction\" or \"word: start-end\" "
                             "with 0 <= start <= end <= 1, items separated by commas (e.g. \"dog: 0.4\")")
        out[word] = win
    return out


def _has(tp: p2p.TokenizedPrompt, word: str) -> bool:
    try:
        tp.positions(word)
        return True
    except ValueError:
        return False


def controller(inv: Inversion, source: p2p.TokenizedPrompt, target: p2p.TokenizedPrompt, mode: str = "replace", *,
               cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
               reweight: dict[str, float] | None = None, blend_words: Sequence[str] = (),
               windows: dict[str, tuple[float, float]] | None = None) -> p2p.AttentionControl:
    """The prompt-to-prompt controller for editing ``inv`` (caption ``source``) towards ``target``: ``mode``
    replace / refine / reweight, ``reweight`` {word of the target: factor}, local blending on ``blend_words``
    (words of either prompt), per-word cross-attention ``windows`` of target words; self-attention is injected
    in layers of at most 1/16 of the latent's pixels (the paper's 16×16 at 512 px)."""
    for w in reweight or {}:
        target.positions(w)  # names the missing word
    blend = None
    if blend_words:
        src_w = [w for w in blend_words if _has(source, w)]
        edit_w = [w for w in blend_words if _has(target, w)]
        if not src_w and not edit_w:
            raise ValueError(f"blend_words {list(blend_words)} are in neither prompt: name words of the caption "
                             f"({inv.prompt!r}) or of the target ({' '.join(target.words)!r})")
        blend = (src_w, edit_w)
    cross = {"default_": cross_replace_steps, **windows} if windows else cross_replace_steps
    h, w = inv.latents[0].shape[-2:]
    ctrl = p2p.prompt_to_prompt(source, [target], mode, reweight=reweight or None, cross_replace_steps=cross,
                                self_replace_steps=self_replace_steps, self_max_tokens=h * w // 16,
                                blend_words=blend, max_len=inv.cond.shape[1])
    if ctrl.local_blend is not None:
        ctrl.local_blend.max_tokens = h * w // 16
    return ctrl


def edit(model, inv: Inversion, cond_edit: Conditioning, ctrl: p2p.AttentionControl, guidance: float = 7.5,
         callback: nt.Callback | None = None) -> torch.Tensor:
    """Prompt-to-prompt: the caption and the edit (context ``cond_edit``) sampled together from z*_N with the
    inversion's null embeddings (and, after Direct Inversion, its corrections added to the source row), ``ctrl``
    injecting the source's attention (``model`` must route its attention through it: host/sd.py's
    SDModel(model, ctrl)). Returns the latents [2, C, h, w]: the reconstruction, then the edit."""
    inv.check_model(model)
    with torch.inference_mode(False):
        cond = C.cat([inv.cond, cond_edit]).to(model.device)
        z = inv.latents[-1].to(model.device).expand(2, -1, -1, -1).clone()
        nulls = [n.to(model.device) for n in inv.step_nulls()]
    return nt.ddim_sample_cfg(model.eps, inv.schedule(), z, cond, nulls, guidance, controller=ctrl,
                              callback=callback, corrections=inv.step_corrections(model.device))


def sdedit_steps(inv: Inversion, t0: float) -> int:
    """The number of DDIM steps SDEdit at strength t0 runs (its callback's ``total``)."""
    return inv.steps - nt.sdedit_start_step(inv.schedule(), t0)


def sdedit_run(model, inv: Inversion, cond: Conditioning, t0: float, guidance: float = 7.5,
               start: str = "inversion", seed: int = 0, callback: nt.Callback | None = None) -> torch.Tensor:
    """SDEdit towards ``cond`` from strength t0: from the inverted z*_k with the inversion's null embeddings (and
    Direct Inversion's corrections, which pull every step back by the source's own drift) ("inversion"), or from q_sample(z0, k) with fresh noise (``seed``) and the empty prompt's embedding
    ("random noise", plain SDEdit). Returns the latent z̄_0."""
    inv.check_model(model)
    sched = inv.schedule()
    k = sched.steps - nt.sdedit_start_step(sched, t0)
    with torch.inference_mode(False):
        c = cond.to(model.device)
        z0 = inv.latents[0].to(model.device)
        if start == "inversion":
            nulls = [n.to(model.device) for n in inv.step_nulls()]
            return nt.sdedit(model.eps, sched, z0, c, nulls, t0, guidance,
                             start_latent=inv.latents[k].to(model.device), callback=callback,
                             corrections=inv.step_corrections(model.device))
        if start != "random noise":
            raise ValueError(f"start {start!r} unknown: use one of {list(SDEDIT_STARTS)}")
        gen = torch.Generator().manual_seed(int(seed))
        return nt.sdedit(model.eps, sched, z0, c, inv.uncond.to(model.device), t0, guidance, generator=gen,
                         callback=callback)


def sdedit_runs(model, inv: Inversion, cond: Conditioning, t0s: list[float], guidance: float, seed: int,
                decode: Callable[[torch.Tensor], torch.Tensor], plain: bool = True) -> list[fid.Run]:
    """The SDEdit points of a fidelity sweep (models/fidelity.py): every t0 after NULL-text inversion, then with
    ``plain`` every t0 of plain SDEdit; ``decode`` turns each result's latent into [1, 3, H, W] in 0..1."""
    inv.check_model(model)
    name = "NULL-text" if inv.method in OPTIMISING else {"negative-prompt": "negative-prompt",
                                                         "direct": "direct"}[inv.method]
    methods = [(f"SDEdit after {name} inversion", "inversion")] + \
        ([("plain SDEdit", "random noise")] if plain else [])

    def make(t0: float, start: str):
        return lambda: decode(sdedit_run(model, inv, cond, t0, guidance, start, seed))
    return [fid.Run(name, "t0", t0, make(t0, start)) for name, start in methods for t0 in t0s]
