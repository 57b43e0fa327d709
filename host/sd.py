"""Stable Diffusion through ComfyUI: its MODEL / CLIP / VAE as the engine's protocols, and ComfyUI itself as a
checkpoint loader for the command line.

- ``SDModel``: a MODEL as the core's ``eps(x_t, t, cond)`` (models/nulltext.py), with its DDIM schedule, its
  VAE's latent space (``encode`` / ``decode``) and a cheap latent preview:
  - the schedule from the model's own ``model_sampling``: ᾱ = 1 / (σ² + 1);
  - ε from ``BaseModel.apply_model`` (which takes x in σ-space and returns the denoised x̂0):
    x_in = x·sqrt(1 + σ²), ε = (x_in − x̂0) / σ — right for ε- and v-prediction models (SD2.x 768-v);
  - the conditioning (``condition``): SD1.x/SD2.x one cross-attention context; SDXL a ``Cond`` of the two text
    encoders' context and ``y`` = ``encode_adm`` of CLIP-G's pooled output and the size/crop conditioning as
    ComfyUI's sampler builds it (width/height = the latent's × 8, crop 0, target = size);
  - a batch is split (at the CFG branches, then at prompt-to-prompt's row groups) when ComfyUI's own estimate
    (``memory_required`` × 1.5 against ``get_free_memory``, its rule for batching cond and uncond) says that the
    whole batch does not fit;
  - latents in the model's space (``process_latent_in`` after the VAE, ``process_latent_out`` before it);
  - prompt-to-prompt through ``set_model_attn1_replace`` / ``set_model_attn2_replace`` on a clone of the MODEL
    (the incoming model is never modified).
- ``encode_text`` / ``tokenized``: a prompt's context and its words, from ComfyUI's CLIP (one 77-token chunk;
  every text encoder of the CLIP, SDXL's two, is checked).
- ``invert_image``: NULL-text inversion of an IMAGE (models/inversion.py's ``invert`` between the text encoder and
  the VAE), for the NullTextInvert node and ``fidelity --sd-checkpoint``.
- ``import_comfyui`` / ``load_checkpoint``: the command line's way to ComfyUI (never installs it).
SD1.x, SD2.x (ε or v) and SDXL-family models (4-channel latents, a discrete schedule).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import inversion
from ..models import nulltext as nt
from ..models import p2p
from ..models.cond import Cond, Conditioning
from ..models.ddpm import thaw
from ..models.inversion import Inversion

log = logging.getLogger(__name__)


# Bytes autograd keeps for NULL-text's Adam step (forward with grad w.r.t. the null context + backward) per latent
# pixel, the UNet computing in a 2-byte precision: tests/memory_sdxl.py's count on meta tensors (SDXL base 6.43 GiB
# at 128², SD1.5 0.89 GiB at 64²; linear in the pixels); other families take the larger.
GRAD_BYTES_PER_PIXEL = {"SDXL": 421_000, "SD15": 233_000}


class SDModel:
    """A ComfyUI MODEL as the core's ``eps(x_t, t, context)``, loaded on its device.

    With a controller (prompt-to-prompt) the MODEL is cloned and every transformer block's self- and
    cross-attention is replaced by the controller's patch; the incoming MODEL is left as it was."""

    def __init__(self, model, controller=None, grad: bool = False):
        import comfy.model_management as mm  # the host's loader
        self.controller = controller
        self.patcher = model.clone() if controller is not None else model
        if controller is not None:
            for name, number in p2p.comfy_block_keys():
                self.patcher.set_model_attn1_replace(p2p.attention_patch(controller, False), name, number)
                self.patcher.set_model_attn2_replace(p2p.attention_patch(controller, True), name, number)
        self.base = self.patcher.model
        self.has_y = check_sd(self.base)
        self.grad = grad
        mm.load_models_gpu([self.patcher])
        if grad:  # ComfyUI builds and moves models in inference mode: autograd cannot save those weights
            thaw(self.base.diffusion_model)
        self.device = self.patcher.load_device
        ms = self.patcher.get_model_object("model_sampling")
        sigmas = getattr(ms, "sigmas", None)
        if sigmas is None or sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("this MODEL has no discrete noise schedule (model_sampling.sigmas): NULL-text "
                             "inversion needs an SD1.x/SD2.x checkpoint")
        # recorded in every Inversion, so that a file made with one model is refused by another
        cfg_name = type(getattr(self.base, "model_config", None)).__name__
        model_type = getattr(getattr(self.base, "model_type", None), "name", "EPS")
        self.family = f"{cfg_name}/{model_type}"
        # SD1.x/SD2.x: one cross-attention context; SDXL: the context and the vector y (pooled + size)
        self.cond_kind = "context+y" if self.has_y else "context"
        with torch.inference_mode(False):
            self.sigmas = sigmas.detach().float().clone().to(self.device)
            self.alphas_cumprod = (1.0 / (sigmas.detach().double().cpu() ** 2 + 1)).clone()

    def grad_memory(self, latent: torch.Tensor) -> int:
        """Bytes NULL-text's Adam step keeps for the backward on a latent shaped like ``latent`` (GRAD_BYTES_PER_PIXEL
        scaled to the precision the UNet computes in)."""
        name = type(getattr(self.base, "model_config", None)).__name__
        per_pixel = GRAD_BYTES_PER_PIXEL.get(name, max(GRAD_BYTES_PER_PIXEL.values()))
        dtype = getattr(self.base, "manual_cast_dtype", None) or self.base.get_dtype()
        h, w = latent.shape[-2:]
        return int(per_pixel * h * w * torch.empty(0, dtype=dtype).element_size() / 2)

    def reserve_for_grad(self, latent: torch.Tensor) -> None:
        """Before NULL-text optimisation: load the UNet asking ComfyUI for ``grad_memory`` on top of it, so that it
        offloads other models (text encoders, VAE) first when the backward would not fit beside them."""
        import comfy.model_management as mm
        need = self.grad_memory(latent)
        log.debug("NULL-text: reserving %.2f GiB for the backward", need / 2**30)
        mm.load_models_gpu([self.patcher], memory_required=need)
        # ComfyUI may have unloaded and reloaded the UNet itself (in inference mode): weights autograd can save
        thaw(self.base.diffusion_model)

    def schedule(self, steps: int) -> nt.DDIMSchedule:
        return nt.DDIMSchedule(steps, alphas_cumprod=self.alphas_cumprod)

    def condition(self, clip, text: str, latent: torch.Tensor) -> Conditioning:
        """The conditioning of ``text`` for latents shaped like ``latent`` (float32, CPU): the context (SD1.x,
        SD2.x), or a ``Cond`` with SDXL's ``y`` for an image of the latent's size × 8, uncropped, as ComfyUI's
        sampler builds it for a CLIPTextEncode conditioning."""
        context, pooled = encode_text(clip, text, pooled=True)
        if not self.has_y:
            return context
        if pooled is None:
            raise ValueError("this CLIP gives no pooled output, which SDXL needs: use the CLIP of the SDXL "
                             "checkpoint (Load Checkpoint's CLIP output)")
        height, width = (int(v) * 8 for v in latent.shape[-2:])
        with torch.inference_mode(False):
            y = self.base.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                     target_width=width, target_height=height, device=self.device)
            return Cond(context, y.detach().float().cpu().clone())

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε for a batch; split into calls that fit (``rows_per_call``) at the CFG branches and row groups."""
        n = x.shape[0]
        rows = self.rows_per_call(x) if n > 1 else n
        if rows >= n:
            return self._eps(x, t, cond, None)
        out = [self._eps(x[a:b], t[a:b], cond[a:b], kinds) for a, b, kinds in self.split(n, rows)]
        return torch.cat(out)

    def _eps(self, x, t, cond, kinds) -> torch.Tensor:
        sigma = self.sigmas[t.to(self.sigmas.device)].to(x.device)
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        x_in = x * (1 + s * s).sqrt()
        options = dict(self.patcher.model_options.get("transformer_options", {}))  # the UNet writes into it
        if kinds is not None:
            options["cond_or_uncond"] = kinds  # which CFG branch each chunk is (read by prompt-to-prompt)
        extra = {"y": cond.y} if isinstance(cond, Cond) and cond.y is not None else {}
        denoised = self.base.apply_model(x_in, sigma, c_crossattn=cond.context if isinstance(cond, Cond) else cond,
                                         transformer_options=options, **extra)
        return (x_in - denoised.to(x.dtype)) / s

    def rows_per_call(self, x: torch.Tensor) -> int:
        """How many rows of ``x`` one UNet call may take: ComfyUI's estimate of the call's memory × 1.5 against
        the device's free memory (its rule for batching the CFG branches), at least 1."""
        import comfy.model_management as mm
        free = mm.get_free_memory(x.device)
        rows = x.shape[0]
        while rows > 1 and self.base.memory_required([rows, *x.shape[1:]]) * 1.5 >= free:
            rows -= 1
        return rows

    def split(self, n: int, rows: int) -> list[tuple[int, int, list[int] | None]]:
        """Slices (start, end, CFG kinds of the slice) of a batch of ``n`` rows in calls of at most ``rows``: whole
        CFG branches when they fit (the controller's ``cond_or_uncond``, one equal chunk per branch), else parts
        of one branch; never splitting prompt-to-prompt's groups [source, edits…]."""
        ctrl = self.controller
        group = ctrl.group if ctrl is not None else 1
        kinds = getattr(ctrl, "cond_or_uncond", None) if ctrl is not None else None
        if not kinds or n % len(kinds) or (n // len(kinds)) % group:
            kinds = None
        chunk = n // len(kinds) if kinds else n
        size = max(group, rows - rows % group)
        if kinds and size >= chunk:
            size -= size % chunk  # whole branches
        elif kinds:
            while chunk % size:
                size -= group  # a divisor of the branch, in whole groups
        out = []
        for a in range(0, n, size):
            b = min(a + size, n)
            out.append((a, b, None if kinds is None else kinds[a // chunk:(b - 1) // chunk + 1]))
        return out

    def encode(self, vae, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IMAGE [1, H, W, C] (or [H, W, C]) → (its latent in the model's space, the IMAGE the VAE saw: sides
        cropped to a multiple of its downscale)."""
        with torch.no_grad():
            pixels = image[..., :3] if image.ndim == 4 else image[None, ..., :3]
            z = vae.encode(pixels)
            source = vae.vae_encode_crop_pixels(pixels) if hasattr(vae, "vae_encode_crop_pixels") else pixels
            return self.base.process_latent_in(z.float()), source

    def decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents → IMAGE [B, H, W, 3]."""
        with torch.no_grad():
            img = vae.decode(self.base.process_latent_out(z.float()).to(torch.float32))
        return img.float().cpu().clamp(0, 1)[..., :3]

    def decode_pixels(self, vae, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents → [B, 3, H, W] in 0..1 (the engine's image layout)."""
        return self.decode(vae, z).movedim(-1, 1)

    def preview(self, z: torch.Tensor) -> torch.Tensor | None:
        """A cheap RGB view of the last latent of a batch (the edit; [1, 3, 8h, 8w] in [−1, 1]) from the latent
        format's factors."""
        fmt = getattr(self.base, "latent_format", None)
        factors = getattr(fmt, "latent_rgb_factors", None)
        if factors is None:
            return None
        w = torch.tensor(factors, dtype=torch.float32, device=z.device)
        if w.shape[0] != z.shape[1]:
            return None
        rgb = torch.einsum("bchw,cr->brhw", z[-1:].float(), w)
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
        return F.interpolate(rgb, scale_factor=8, mode="nearest").clamp(-1, 1)


def check_sd(base) -> bool:
    """SD1.x / SD2.x (a 4-channel latent UNet with one cross-attention context) or SDXL (also the vector y of
    ``model_base.SDXL``); True for SDXL. ValueError naming the model otherwise."""
    import comfy.model_base
    unet = getattr(base, "diffusion_model", None)
    cfg = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    name = type(getattr(base, "model_config", None)).__name__
    has_y = bool(cfg.get("adm_in_channels") or getattr(base, "adm_channels", 0))
    if unet is None or not hasattr(unet, "input_blocks") or cfg.get("in_channels", 4) != 4 or \
            (has_y and type(base) is not comfy.model_base.SDXL):
        raise ValueError(f"NULL-text inversion supports Stable Diffusion 1.x, 2.x and SDXL checkpoints; this MODEL "
                         f"is {name}: load an SD1.5, SD2.1 or SDXL base checkpoint with Load Checkpoint")
    return has_y


def encode_text(clip, text: str, pooled: bool = False):
    """A prompt's cross-attention context [1, L, D] (float32, CPU; SDXL: both text encoders' outputs side by
    side, as ComfyUI's CLIPTextEncode gives them); with ``pooled`` (context, pooled output or None). One 77-token
    chunk."""
    tokens = clip.tokenize(text)
    for key, chunks in tokens.items():
        if len(chunks) != 1:
            raise ValueError(f"the prompt {text!r} is longer than one 77-token chunk of the text encoder: "
                             "shorten it (NULL-text inversion and prompt-to-prompt use a single chunk)")
    out = clip.encode_from_tokens(tokens, return_pooled=pooled)
    cond, vec = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    with torch.inference_mode(False):
        cond = cond.detach().float().cpu().clone()
        vec = None if vec is None else vec.detach().float().cpu().clone()
    return (cond, vec) if pooled else cond


def tokenized(clip, text: str) -> p2p.TokenizedPrompt:
    """The prompt's words and BPE tokens for prompt-to-prompt, checked against the host's own tokenizer
    (so the token positions the controller edits are the ones the text encoder sees)."""
    tp = p2p.tokenize(text)
    flat = [t for w in tp.tokens for t in w]
    for seqs in clip.tokenize(text).values():  # every text encoder (SDXL: "l" and "g") at the same positions
        ids, weights = [], []
        for item in seqs[0]:
            tok = item[0]
            ids.append(int(tok) if not torch.is_tensor(tok) or tok.numel() == 1 else -1)
            weights.append(float(item[1]))
        end = ids.index(p2p.EOT, 1) if p2p.EOT in ids[1:] else len(ids)
        if ids[:1] != [p2p.SOT] or ids[1:end] != flat or any(w != 1.0 for w in weights[:end + 1]):
            raise ValueError(f"prompt-to-prompt needs plain prompts: {text!r} uses prompt weights, embeddings or "
                             "text the tokenizers split differently; remove (word:weight) and embedding: syntax")
    return tp


def prepare_inversion(sd: SDModel, clip, vae, image: torch.Tensor, prompt: str, *, optimise: bool):
    """What an inversion of one IMAGE starts from: (its latent z0, the source IMAGE as the VAE cropped it, the
    caption's and the empty prompt's conditionings, the seconds the VAE encode took). With ``optimise`` (NULL-text
    will take Adam steps) ComfyUI is then asked for room for the backward (``reserve_for_grad``): after the VAE and
    the text encoders ran, so that it may offload them."""
    t = time.perf_counter()
    z0, source = sd.encode(vae, image)
    encode_s = time.perf_counter() - t
    cond, uncond = sd.condition(clip, prompt, z0), sd.condition(clip, "", z0)
    if optimise and sd.grad:
        sd.reserve_for_grad(z0)
    return z0, source, cond, uncond, encode_s


def invert_image(sd: SDModel, clip, vae, image: torch.Tensor, prompt: str, *, steps: int = 50, guidance: float = 7.5,
                 inner_steps: int = 10, global_null: bool = False, callback=None,
                 started: float | None = None, method: str = "null-text") -> tuple[Inversion, torch.Tensor]:
    """NULL-text inversion of one IMAGE captioned ``prompt`` (models/inversion.py's ``invert`` between ComfyUI's
    text encoder and VAE): (the inversion, its reconstruction as an IMAGE). ``callback(done, total, latent)`` as
    the engine's (``total`` = ``invert_steps(...)``); ``started``: the ``time.perf_counter()`` the caller's run
    began at (its total_s; default now). Its info adds the reconstruction's mean absolute pixel error."""
    started = time.perf_counter() if started is None else started
    optimise = inner_steps > 0 and inversion.resolve_method(method, global_null) in inversion.OPTIMISING
    z0, source, cond, uncond, _ = prepare_inversion(sd, clip, vae, image, prompt, optimise=optimise)
    inv, rec = inversion.invert(sd, z0, cond, uncond, prompt=prompt, source=source, steps=steps, guidance=guidance,
                                inner_steps=inner_steps, global_null=global_null, method=method, callback=callback)
    recon = sd.decode(vae, rec)
    inv.info["pixel_mae"] = float((recon - inv.source).abs().mean()) if recon.shape == inv.source.shape else None
    inv.info["total_s"] = round(time.perf_counter() - started, 3)
    log.info("%s inversion: %d steps, latent MSE %.3g, %.1f s", inv.method, steps, inv.info["latent_mse"],
             inv.info["total_s"])
    return inv, recon


# --------------------------------------------------------------------------------------------- the command line
def import_comfyui(path: str | None, device) -> None:
    """Make ComfyUI importable: ``path`` (or $COMFYUI_PATH) is added to sys.path, and without a CUDA device
    ComfyUI runs on the CPU (its --cpu, set before comfy.model_management is imported). Never installs it.
    ValueError: ``path`` is no ComfyUI installation; ImportError: ComfyUI does not import with this Python."""
    path = path or os.environ.get("COMFYUI_PATH") or None
    where = ""
    if path:
        root = Path(path).expanduser().resolve()
        if not (root / "comfy" / "sd.py").is_file():
            raise ValueError(f"{path}: not a ComfyUI installation (it has no comfy/sd.py)")
        if str(root) not in sys.path:
            sys.path.append(str(root))
        where = f" at {root}"
    try:
        from comfy.cli_args import args as comfy_args
        if "comfy.model_management" not in sys.modules and (device.type == "cpu" or not torch.cuda.is_available()):
            comfy_args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as e:
        if not path:
            raise ImportError(f"ComfyUI is not importable here ({e})") from None
        raise ImportError(f"ComfyUI{where} does not import with this Python ({e})") from None


def load_checkpoint(path: Path):
    """(MODEL, CLIP, VAE) of a Stable Diffusion checkpoint, loaded as ComfyUI's Load Checkpoint does.
    ValueError (starting with the path) for a file ComfyUI cannot load or that lacks a part."""
    import comfy.sd
    try:
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                    embedding_directory=None)
    except Exception as e:  # ComfyUI raises RuntimeError and others for files it cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: ComfyUI could not load it ({first}); give a Stable Diffusion "
                         "1.x/2.x/SDXL checkpoint") from None
    model, clip, vae = out[:3]
    if model is None or clip is None or vae is None or getattr(vae, "first_stage_model", True) is None:  # no VAE keys
        raise ValueError(f"{path}: the file lacks the UNet, text encoder or VAE: give a full "
                         "Stable Diffusion 1.x/2.x/SDXL checkpoint")
    return model, clip, vae
