"""LoadDDPM and LoadCLIP, with a small cache: weights are kept per (file, device) and shared by
every schedule/precision built on them, so changing the respacing or precision widget rebuilds
only the schedule (cheap) and never re-reads the checkpoint."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from ..models import ClipModel, DDPM, load_clip, load_ddpm
from ..models.weights import official
from .. import host
from .common import CATEGORY, CLIP_T, DDPM_T

log = logging.getLogger(__name__)

MAX_FILES = 2     # checkpoints kept loaded per kind (least recently used is dropped)
MAX_VARIANTS = 8  # schedules / precisions kept on top of them

_weights: dict[str, OrderedDict] = {"ddpm": OrderedDict(), "clip_guidance": OrderedDict()}
_variants: dict[str, OrderedDict] = {"ddpm": OrderedDict(), "clip_guidance": OrderedDict()}
PRECISIONS = ["fp32", "fp16", "bf16", "auto"]  # auto: what the host picks for its device (host.auto_precision)


def _file_key(path: str, device) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size, str(device))


def _remember(cache: OrderedDict, key, value, limit: int):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def clear_cache() -> None:
    """Drop every loaded model (the next load reads the files again)."""
    for c in (*_weights.values(), *_variants.values()):
        c.clear()
    host.free_memory()


def _cached(kind: str, path: str, variant: tuple, load, rebuild):
    """The object for (file, device, *variant): cached, rebuilt on cached weights, or loaded."""
    device = host.model_build_device()  # ComfyUI moves it to its compute device when a node needs it
    fkey = _file_key(path, device)
    key = fkey + variant
    variants, weights = _variants[kind], _weights[kind]
    if key in variants:
        variants.move_to_end(key)
        weights.move_to_end(fkey)
        return variants[key]
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; guidance needs grads
        if fkey in weights:
            obj = rebuild(weights[fkey])
        else:
            obj = load(device)
            dropped = len(weights) >= MAX_FILES
            _remember(weights, fkey, obj, MAX_FILES)
            if dropped:  # forget the variants of files no longer held
                for k in [k for k in variants if k[:4] not in weights]:
                    del variants[k]
                host.free_memory()
    _remember(variants, key, obj, MAX_VARIANTS)
    return obj


def get_ddpm(path: str, respacing: str = "100", precision: str = "fp32") -> DDPM:
    respacing = str(respacing).strip()
    if precision == "auto":
        precision = host.auto_precision("ddpm")

    return _cached("ddpm", path, (respacing, precision),
                   lambda dev: load_ddpm(path, respacing=respacing, precision=precision, device=dev),
                   lambda base: base.respaced(respacing, precision))


def get_clip(path: str, precision: str = "fp32") -> ClipModel:
    if precision == "auto":
        precision = host.auto_precision("clip_guidance")
    return _cached("clip_guidance", path, (precision,),
                   lambda dev: load_clip(path, device=dev, precision=precision),
                   lambda base: ClipModel(base.model, base.path, precision))


def _combo(kind: str, default: str) -> tuple:
    """The files present plus the official files not yet downloaded (fetched on first use, host.fetch_model)."""
    names = sorted(set(host.list_models(kind)) | {w.name for w in official(kind)})
    opts = {"default": default} if default in names else {}
    return names, opts


class LoadDDPM:
    @classmethod
    def INPUT_TYPES(cls):
        names, opts = _combo("ddpm", "256x256_diffusion_uncond.pt")
        return {"required": {
            "ckpt_name": (names, {**opts, "tooltip":
                "guided-diffusion checkpoint in models/ddpm (e.g. 256x256_diffusion_uncond.pt, the "
                "paper's model; 512x512_diffusion.pt is class-conditional). The official files are listed even "
                "when absent and downloaded on first use (not with BLENDED_DIFFUSION_OFFLINE=1)."}),
            "respacing": ("STRING", {"default": "100", "tooltip":
                "Timestep respacing: number of denoising steps kept from the 1000 ('100' as in the paper, "
                "'ddim50' for a DDIM-friendly spacing, or per-section counts like '10,10,10'). Changing it "
                "does not reload the weights."}),
            "precision": (PRECISIONS, {"default": "fp32", "tooltip":
                "Compute precision of the UNet (autocast). fp16/bf16 save memory and time on a GPU; "
                "fp32 is the reference. auto: what ComfyUI picks for its device (its --fp16-unet / "
                "--bf16-unet / --force-fp32 flags apply)."}),
        }}

    RETURN_TYPES = (DDPM_T,)
    RETURN_NAMES = ("ddpm",)
    OUTPUT_TOOLTIPS = ("The diffusion model with its sampling schedule.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Loads a guided-diffusion pixel DDPM (the model Blended Diffusion edits with)."

    def load(self, ckpt_name, respacing="100", precision="fp32"):
        return (get_ddpm(host.fetch_model("ddpm", ckpt_name), respacing, precision),)


class LoadCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        names, opts = _combo("clip_guidance", "ViT-B-16.pt")
        return {"required": {
            "clip_name": (names, {**opts, "tooltip":
                "OpenAI-format CLIP with image and text towers in models/clip_guidance (e.g. ViT-B-16.pt "
                "as in the paper; TorchScript .pt, state-dict .pt/.bin or .safetensors). ViT-B-16.pt is listed "
                "even when absent and downloaded on first use (not with BLENDED_DIFFUSION_OFFLINE=1)."}),
            "precision": (PRECISIONS, {"default": "fp32", "tooltip":
                "Compute precision of CLIP (autocast); fp32 is the reference. auto: what ComfyUI picks for "
                "a text encoder on its device (--fp32-text-enc, --force-fp32 apply)."}),
        }}

    RETURN_TYPES = (CLIP_T,)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The CLIP model that guides the edit and ranks results.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Loads a CLIP model used as the text-guidance loss (not ComfyUI's text-encoder CLIP)."

    def load(self, clip_name, precision="fp32"):
        return (get_clip(host.fetch_model("clip_guidance", clip_name), precision),)
