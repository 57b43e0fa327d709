"""NULL-text inversion and editing of real images with ComfyUI's own Stable Diffusion MODEL / CLIP / VAE.

Invert once (``NullTextInvert``: DDIM inversion at guidance 1, then NULL-text optimisation at the edit
guidance), keep the result (``SaveInversion`` / ``LoadInversion``: one .safetensors file), and edit many
times from it: prompt-to-prompt (``NullTextEdit``), SDEdit (``NullTextSDEdit``), and the supplement's
fidelity/editability sweep (``FidelityCurve``); ``CompareInversionMethods`` measures every inversion method on one
image (models/compare.py).

The nodes declare their inputs, call the engine and format its results: the runs and the inversion's file format
are models/inversion.py (over the pure-torch core, models/nulltext.py and models/p2p.py; the core's own DDIM
loop, not KSampler, CFG batch order [uncond, cond]); host/sd.py adapts ComfyUI's MODEL / CLIP / VAE to it.
SD1.x / SD2.x models only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import host
from ..host.sd import SDModel, invert_image, prepare_inversion, tokenized
from ..models import compare as cmp
from ..models import fidelity as fid
from ..models import inversion as ni
from ..render import figure, table
from .common import CATEGORY, CLIP_T, CONTEXT_TIP, DDPM_T, MAX_SEED, bchw_to_image, image_to_bchw, mask_to_bhw

log = logging.getLogger(__name__)

NT_CATEGORY = f"{CATEGORY}/NULL-text"
INVERSION_T = "BD_INVERSION"
MODES = ["replace", "refine", "reweight"]
STARTS = list(ni.SDEDIT_STARTS)
SD_TOOLTIPS = {
    "model": "The Stable Diffusion 1.x/2.x/SDXL MODEL (e.g. from Load Checkpoint). Use the model the inversion "
             "was made with.",
    "clip": "The checkpoint's CLIP text encoder (from Load Checkpoint).",
    "vae": "The checkpoint's VAE (from Load Checkpoint).",
    "inversion": "The inversion to edit (NULL-text Invert, or Load Inversion).",
}



def sd_inputs() -> dict:
    """The MODEL, CLIP and VAE inputs every Stable Diffusion node of this pack starts with (from Load Checkpoint)."""
    return {"model": ("MODEL", {"tooltip": SD_TOOLTIPS["model"]}),
            "clip": ("CLIP", {"tooltip": SD_TOOLTIPS["clip"]}),
            "vae": ("VAE", {"tooltip": SD_TOOLTIPS["vae"]})}

# --------------------------------------------------------------------------------------------- helpers
def _progress(bar, sd: SDModel):
    """The engine's step callback → the node's progress bar with a latent preview, and Cancel."""
    def cb(done, _total, z):
        bar.update(done, sd.preview(z))
        host.check_interrupt()
    return cb


def _inversion_path(name: str, *, for_reading: bool) -> Path:
    name = name.strip()
    if not name:
        raise ValueError("give a file name for the inversion (e.g. nulltext/my_photo)")
    p = Path(name)
    if p.suffix.lower() != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    if p.is_absolute():
        return p
    if ".." in p.parts:
        raise ValueError(f"{name!r}: a relative name may not leave the output folder; give an absolute path")
    candidates = [host.output_dir() / p]
    if for_reading and host.input_dir() is not None:
        candidates.append(host.input_dir() / p)
    if for_reading:
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"no inversion {p} in {' or '.join(str(c.parent) for c in candidates)}: save one "
                                "with Save Inversion first, or give the file's absolute path")
    return candidates[0]



def _write_outputs(fig, text: str, prefix: str, default: str) -> tuple[Path, Path]:
    """Write a figure and its CSV to ComfyUI's output folder as <prefix>_NNNNN.png / .csv (the first number
    free for both; ``default`` for an empty prefix). ValueError for a prefix that leaves the output folder."""
    prefix = prefix.strip() or default
    if Path(prefix).is_absolute() or ".." in Path(prefix).parts:
        raise ValueError(f"filename_prefix {prefix!r} must be relative to the output folder")
    base = host.output_dir() / prefix
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1

    def taken(k):
        return any((base.parent / f"{base.name}_{k:05d}{ext}").exists() for ext in (".png", ".csv"))
    while taken(n):
        n += 1
    png, csv_path = base.parent / f"{base.name}_{n:05d}.png", base.parent / f"{base.name}_{n:05d}.csv"
    fig.save(png)
    csv_path.write_text(text)
    return png, csv_path


def _image_of(fig) -> torch.Tensor:
    """A PIL figure as an IMAGE [1, H, W, 3]."""
    return torch.from_numpy(np.asarray(fig.convert("RGB"), dtype=np.float32) / 255.0)[None]


# --------------------------------------------------------------------------------------------- nodes

def _with_ready(make, ddpm, clip):
    """Run ``make()`` with ``ddpm`` (may be None) and ``clip`` loaded (host.load_models), then reload ``clip`` for
    scoring: a Stable Diffusion run may have offloaded it."""
    if ddpm is not None:
        host.load_models(ddpm, clip)
    out = make()
    host.load_models(clip)
    return out

class NullTextInvert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sd_inputs(),
            "image": ("IMAGE", {"tooltip": "The real image to invert (one image; sides are cropped to a "
                                           "multiple of 8, 512x512 suits SD1.x)."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "A caption of the image. The edits start from it: prompt-to-prompt swaps, adds or reweights "
                "its words."}),
            "steps": ("INT", {"default": 50, "min": 2, "max": 1000, "tooltip":
                "DDIM steps (the paper: 50). Every edit of this inversion uses the same steps."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                "Classifier-free guidance scale the null embeddings are optimised for (the paper: 7.5); "
                "edit with the same scale."}),
            "inner_steps": ("INT", {"default": 10, "min": 0, "max": 100, "tooltip":
                "Adam steps per DDIM step (the paper: 10; stops early once the loss is below 1e-5 + i·2e-5). "
                "With global_null: passes over all steps. 0 = no optimisation (plain DDIM inversion; the empty "
                "prompt's embedding is kept as one global null embedding)."}),
            "global_null": ("BOOLEAN", {"default": False, "tooltip":
                "One null embedding for all steps (supplement Algorithm 2) instead of one per step: smaller, "
                "but converges much more slowly."}),
            "method": (list(ni.METHODS), {"default": "null-text", "tooltip":
                "null-text: optimise a null embedding per step (slowest, the paper's). null-text global: one for all "
                "steps (same as global_null). negative-prompt: the caption's embedding as the null one, no "
                "optimisation (fast, approximate). direct: Direct Inversion, per-step corrections of the source "
                "branch, no optimisation (fast, exact reconstruction). inner_steps applies to null-text only."}),
        }}

    RETURN_TYPES = (INVERSION_T, "IMAGE", "STRING")
    RETURN_NAMES = ("inversion", "reconstruction", "report")
    OUTPUT_TOOLTIPS = ("The inverted noise trajectory, null embeddings and caption (save it to edit later).",
                       "The image rebuilt from the inversion at the given guidance (should match the input).",
                       "JSON: per-step losses, reconstruction error and the time each stage took.")
    FUNCTION = "invert"
    CATEGORY = NT_CATEGORY
    DESCRIPTION = ("NULL-text inversion (Mokady et al.): DDIM inversion of a real image with its caption, then "
                   "per-step optimisation of the unconditional (null) embedding so that guided sampling "
                   "reconstructs it. Invert once, then edit many times (prompt-to-prompt, SDEdit).")

    def invert(self, model, clip, vae, image, prompt, steps=50, guidance=7.5, inner_steps=10, global_null=False,
               method="null-text"):
        if image.ndim == 4 and image.shape[0] != 1:
            raise ValueError(f"NULL-text Invert inverts one image at a time, got a batch of {image.shape[0]}: "
                             "pick one (e.g. with Image From Batch)")
        started = time.perf_counter()
        method = ni.resolve_method(method, global_null)
        sd = SDModel(model, grad=inner_steps > 0 and method in ni.OPTIMISING)
        bar = host.progress(ni.invert_steps(steps, inner_steps, method=method), f"{method} inversion")
        try:
            inv, recon = invert_image(sd, clip, vae, image, prompt.strip(), steps=steps, guidance=guidance,
                                      inner_steps=inner_steps, method=method, callback=_progress(bar, sd),
                                      started=started)
        finally:
            bar.close()
        report = json.dumps(inv.report(), indent=1)
        return {"ui": {"text": [report]}, "result": (inv, recon, report)}


class SaveInversion:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inversion": (INVERSION_T, {"tooltip": "The inversion to keep."}),
            "filename": ("STRING", {"default": "nulltext/inversion", "tooltip":
                "File name (.safetensors is added) relative to ComfyUI's output folder, or an absolute path. "
                "An existing file of that name is replaced."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The full path of the saved file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = NT_CATEGORY
    DESCRIPTION = ("Saves an inversion (latent trajectory, null embeddings, caption, source image) as one "
                   ".safetensors file with JSON metadata, so one inversion serves many edits.")

    def save(self, inversion, filename="nulltext/inversion"):
        path = _inversion_path(filename, for_reading=False)
        inversion.to_file(path)
        log.info("saved the NULL-text inversion to %s", path)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


class LoadInversion:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "filename": ("STRING", {"default": "nulltext/inversion", "tooltip":
                "A file written by Save Inversion: a name relative to ComfyUI's output (or input) folder, "
                "or an absolute path (.safetensors may be left out)."}),
        }}

    RETURN_TYPES = (INVERSION_T, "IMAGE", "STRING")
    RETURN_NAMES = ("inversion", "source", "prompt")
    OUTPUT_TOOLTIPS = ("The saved inversion.", "The image that was inverted.", "Its caption.")
    FUNCTION = "load"
    CATEGORY = NT_CATEGORY
    DESCRIPTION = "Loads an inversion saved by Save Inversion (safe loading: tensors and JSON metadata only)."

    @classmethod
    def IS_CHANGED(cls, filename="nulltext/inversion"):
        try:
            return os.path.getmtime(_inversion_path(filename, for_reading=True))
        except (OSError, ValueError):
            return float("nan")

    def load(self, filename="nulltext/inversion"):
        inv = ni.Inversion.from_file(_inversion_path(filename, for_reading=True))
        return (inv, inv.source.clone(), inv.prompt)


class NullTextEdit:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sd_inputs(),
            "inversion": (INVERSION_T, {"tooltip": SD_TOOLTIPS["inversion"]}),
            "target_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "The caption with the change: replace = the same number of words with some swapped "
                "(\"a cat\" → \"a dog\"); refine = words added; reweight = the caption itself (empty = the "
                "inversion's caption) with reweight_words scaled."}),
            "mode": (MODES, {"default": "replace", "tooltip":
                "Prompt-to-prompt edit: replace (word swap), refine (added words), reweight (strengthen or "
                "weaken words)."}),
            "cross_replace_steps": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                "Fraction of the steps (from the start) during which the edit uses the source's cross-attention "
                "maps: higher keeps the layout closer to the source."}),
            "self_replace_steps": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                "Fraction of the steps during which the edit uses the source's self-attention maps (layers up "
                "to 1/16 of the latent's pixels, as the paper): higher keeps more of the source's structure."}),
            "reweight_words": ("STRING", {"default": "", "tooltip":
                "Words of the target prompt whose attention is scaled by reweight_factor (comma or space "
                "separated; empty = none)."}),
            "reweight_factor": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.1, "tooltip":
                "Attention scale for reweight_words (>1 stronger, <1 weaker, 1 = unchanged)."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                "Classifier-free guidance scale; keep the inversion's (7.5 by default)."}),
        }, "optional": {
            "blend_words": ("STRING", {"default": "", "tooltip":
                "Local blending: words of the source and/or target prompt marking the region to change (e.g. "
                "\"cat dog\"); outside their attention the result keeps the source. Empty = off."}),
            "word_replace_steps": ("STRING", {"default": "", "tooltip":
                "Per-word cross-attention windows overriding cross_replace_steps for words of the target "
                "prompt, e.g. \"dog: 0.4, hat: 0.2-0.6\" (a fraction of the steps from the start, or a "
                "start-end window). A swapped word with a shorter window takes more of its own shape. "
                "Empty = off."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Two images: the source's reconstruction, then the edit.",)
    FUNCTION = "edit"
    CATEGORY = NT_CATEGORY
    DESCRIPTION = ("Prompt-to-prompt editing of an inverted real image: samples the source caption and the "
                   "target prompt together from the inverted noise with the optimised null embeddings, "
                   "injecting the source's attention maps into the edit.")

    def edit(self, model, clip, vae, inversion, target_prompt="", mode="replace", cross_replace_steps=0.8,
             self_replace_steps=0.4, reweight_words="", reweight_factor=1.0, guidance=7.5, blend_words="",
             word_replace_steps=""):
        inv = inversion
        target = target_prompt.strip()
        if mode == "reweight" and not target:
            target = inv.prompt
        if not target:
            raise ValueError("NULL-text Edit: give a target prompt (the caption with the change)")
        inv.check_guidance(guidance)
        src_tp, edit_tp = tokenized(clip, inv.prompt), tokenized(clip, target)
        weights = {w: float(reweight_factor) for w in ni.split_words(reweight_words)} \
            if reweight_factor != 1.0 else {}
        ctrl = ni.controller(inv, src_tp, edit_tp, mode, cross_replace_steps=cross_replace_steps,
                             self_replace_steps=self_replace_steps, reweight=weights,
                             blend_words=ni.split_words(blend_words), windows=ni.word_windows(word_replace_steps))
        sd = SDModel(model, ctrl)
        cond_edit = sd.condition(clip, target, inv.latents[0])
        bar = host.progress(inv.steps, "prompt-to-prompt")
        try:
            out = ni.edit(sd, inv, cond_edit, ctrl, guidance, callback=_progress(bar, sd))
        finally:
            bar.close()
        return (sd.decode(vae, out),)


class NullTextSDEdit:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sd_inputs(),
            "inversion": (INVERSION_T, {"tooltip": SD_TOOLTIPS["inversion"]}),
            "target_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "What the result should show (any prompt; empty = the inversion's caption)."}),
            "t0": ("FLOAT", {"default": 0.6, "min": 0.02, "max": 1.0, "step": 0.02, "tooltip":
                "SDEdit strength: the fraction of the DDIM steps re-run (1 = from the inverted noise z_T). "
                "Higher edits more and keeps less of the source."}),
            "start": (STARTS, {"default": "inversion", "tooltip":
                "inversion: start from the inverted latent z*_t0 with the optimised null embeddings (the "
                "supplement's SDEdit after NULL-text inversion); random noise: plain SDEdit (noised source, "
                "empty-prompt embedding)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip":
                "Noise seed for start = random noise (unused with the inversion)."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                "Classifier-free guidance scale; keep the inversion's (7.5 by default)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The edited image.",)
    FUNCTION = "sdedit"
    CATEGORY = NT_CATEGORY
    DESCRIPTION = "SDEdit of an inverted real image: re-runs the last t0 of the DDIM steps towards the target prompt."

    def sdedit(self, model, clip, vae, inversion, target_prompt="", t0=0.6, start="inversion", seed=0, guidance=7.5):
        target = target_prompt.strip() or inversion.prompt
        if start == "inversion":
            inversion.check_guidance(guidance)
        sd = SDModel(model)
        cond = sd.condition(clip, target, inversion.latents[0])
        bar = host.progress(ni.sdedit_steps(inversion, t0), "SDEdit")
        try:
            out = ni.sdedit_run(sd, inversion, cond, t0, guidance, start, seed, callback=_progress(bar, sd))
        finally:
            bar.close()
        return (sd.decode(vae, out),)


class FidelityCurve:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sd_inputs(),
            "inversion": (INVERSION_T, {"tooltip": SD_TOOLTIPS["inversion"]}),
            "guidance_clip": (CLIP_T, {"tooltip":
                "The CLIP image-text model that scores editability (Load CLIP (guidance), e.g. ViT-B-16.pt); "
                "the checkpoint's text encoder cannot see images."}),
            "target_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "The edit's prompt: every result is scored by its CLIP distance to it."}),
            "t0_values": ("STRING", {"default": "0.2, 0.4, 0.6, 0.8, 1.0", "tooltip":
                "SDEdit strengths to sweep (fractions of the DDIM steps, in (0, 1])."}),
            "plain_sdedit": ("BOOLEAN", {"default": True, "tooltip":
                "Also sweep plain SDEdit (noised source, empty-prompt embedding) to compare with SDEdit after "
                "NULL-text inversion."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip":
                "Noise seed of plain SDEdit and of the blended sampler."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                "Classifier-free guidance scale of the SDEdit runs; keep the inversion's."}),
            "filename_prefix": ("STRING", {"default": "nulltext/fidelity", "tooltip":
                "The curve is also written to ComfyUI's output folder as <prefix>_NNNNN.png and .csv."}),
        }, "optional": {
            "ddpm": (DDPM_T, {"tooltip":
                "Optional: also sweep Blended Diffusion (this pack's sampler) over skip_timesteps on the "
                "source image (needs a mask)."}),
            "mask": ("MASK", {"tooltip":
                "Optional: the edited region. Blended Diffusion edits inside it, and all CLIP distances are "
                "then measured on it; without it on the whole image."}),
            "skip_timesteps": ("STRING", {"default": "20, 40, 60, 80", "tooltip":
                "Blended Diffusion sweep: skipped steps of the DDPM's respaced schedule (more = closer to the "
                "source)."}),
            "num_views": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip":
                "Blended Diffusion sweep: augmented views per CLIP evaluation."}),
            "context": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                "Blended Diffusion sweep: " + CONTEXT_TIP}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("plot", "csv", "images")
    OUTPUT_TOOLTIPS = ("Fidelity (LPIPS to the source) versus editability (CLIP distance to the prompt).",
                       "The measurements as CSV: method, parameter, value, lpips, clip_distance.",
                       "Every result of the sweep, in CSV order.")
    FUNCTION = "sweep"
    OUTPUT_NODE = True
    CATEGORY = NT_CATEGORY
    DESCRIPTION = ("The supplement's fidelity/editability measurement: LPIPS to the source versus CLIP distance "
                   "to the target prompt, over SDEdit's t0 with and without NULL-text inversion (and optionally "
                   "Blended Diffusion over skip_timesteps). Writes the plot (PNG) and the CSV.")

    def sweep(self, model, clip, vae, inversion, guidance_clip, target_prompt="", t0_values="0.2, 0.4, 0.6, 0.8, 1.0",
              plain_sdedit=True, seed=0, guidance=7.5, filename_prefix="nulltext/fidelity", ddpm=None, mask=None,
              skip_timesteps="20, 40, 60, 80", num_views=8, context=0.25):
        inv = inversion
        prompt = target_prompt.strip()
        if not prompt:
            raise ValueError("Fidelity Curve: give the target prompt the results are scored against")
        t0s = fid.parse_values(t0_values, "t0_values", 1e-6, 1.0)
        skips = []
        if ddpm is not None:
            if mask is None:
                raise ValueError("Fidelity Curve: the Blended Diffusion sweep needs a mask (the region to edit)")
            skips = [int(s) for s in fid.parse_values(skip_timesteps, "skip_timesteps", 0, ddpm.num_steps - 1)]
        source = image_to_bchw(inv.source)
        m = None if mask is None else mask_to_bhw(mask)[:1]
        sd = SDModel(model)
        cond = sd.condition(clip, prompt, inv.latents[0])
        runs = ni.sdedit_runs(sd, inv, cond, t0s, guidance, seed, lambda z: sd.decode_pixels(vae, z), plain_sdedit)
        if skips:
            from ..models import AugmentSettings, Guide
            guide = Guide(clip=guidance_clip, prompt=prompt, augment=AugmentSettings(num_views=num_views))
            runs += fid.blended_runs(ddpm, guide, source, m, skips, seed=seed, context=context,
                                     callback=lambda *a: host.check_interrupt())
        # ComfyUI may offload the pack's models while the SD runs load theirs: make ours ready before each run
        # (the Blended Diffusion runs) and before each score (CLIP)
        runs = [dataclasses.replace(r, make=lambda r=r: _with_ready(r.make, ddpm if r.method == fid.BLENDED else None,
                                                                     guidance_clip)) for r in runs]
        bar = host.progress(len(runs), "fidelity curve")
        rows, images = [], []
        try:
            for row, img in fid.sweep(runs, source, guidance_clip, prompt, m):
                rows.append(row)
                images.append(img)
                bar.update(len(rows))
                host.check_interrupt()
        finally:
            bar.close()
        text = fid.csv_text(rows)
        fig = figure(rows, prompt)
        png, csv_path = _write_outputs(fig, text, filename_prefix, "nulltext/fidelity")
        log.info("fidelity curve written to %s and %s", png, csv_path)
        size = images[0].shape[-2:]
        images = torch.cat([x if x.shape[-2:] == size else
                            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in images])
        plot = _image_of(fig)
        return {"ui": {"text": [text]}, "result": (plot, text, bchw_to_image(images))}


class CompareInversionMethods:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **sd_inputs(),
            "image": ("IMAGE", {"tooltip": "The real image every method inverts (one image; sides are cropped to "
                                           "a multiple of 8)."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "A caption of the image, as for NULL-text Invert: every method inverts with it."}),
            "methods": ("STRING", {"default": cmp.DEFAULT_METHODS, "tooltip":
                "The inversion methods to compare, comma separated, in table order: any of "
                + ", ".join(ni.METHODS) + "."}),
            "steps": ("INT", {"default": 50, "min": 2, "max": 1000, "tooltip":
                "DDIM steps of every inversion (the paper: 50)."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                "Classifier-free guidance scale of every reconstruction (the paper: 7.5)."}),
            "inner_steps": ("INT", {"default": 10, "min": 0, "max": 100, "tooltip":
                "NULL-text's Adam steps per DDIM step (null-text global: passes over all steps); the other "
                "methods optimise nothing."}),
            "filename_prefix": ("STRING", {"default": "nulltext/compare", "tooltip":
                "The table is also written to ComfyUI's output folder as <prefix>_NNNNN.png and .csv."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("table", "csv", "reconstructions")
    OUTPUT_TOOLTIPS = ("The comparison as a table: one row per method after the VAE round trip, the best value "
                       "of each column in green.",
                       "The measurements as CSV: " + ", ".join(cmp.HEADER) + ".",
                       "The source, the VAE round trip, then each method's reconstruction, in table order.")
    FUNCTION = "compare"
    OUTPUT_NODE = True
    CATEGORY = NT_CATEGORY
    DESCRIPTION = ("Inverts one image with each inversion method (NULL-text, NULL-text global, Negative-Prompt "
                   "Inversion, Direct Inversion) and measures each reconstruction: LPIPS and PSNR to the source, "
                   "PSNR to the VAE round trip (the ceiling, first row), the latent error, the seconds and the "
                   "UNet calls. Writes the table (PNG) and the CSV.")

    def compare(self, model, clip, vae, image, prompt, methods=cmp.DEFAULT_METHODS, steps=50, guidance=7.5,
                inner_steps=10, filename_prefix="nulltext/compare"):
        if image.ndim == 4 and image.shape[0] != 1:
            raise ValueError(f"Compare Inversion Methods compares on one image, got a batch of {image.shape[0]}: "
                             "pick one (e.g. with Image From Batch)")
        names = cmp.parse_methods(methods)
        prompt = prompt.strip()
        sd = SDModel(model, grad=inner_steps > 0 and any(m in ni.OPTIMISING for m in names))
        z0, source, cond, uncond, encode_s = prepare_inversion(sd, clip, vae, image, prompt, optimise=sd.grad)
        bar = host.progress(cmp.total_steps(names, steps, inner_steps), "inversion methods")
        try:
            rows, images = cmp.compare(sd, z0, cond, uncond, source=image_to_bchw(source),
                                       decode=lambda z: sd.decode_pixels(vae, z), methods=names, prompt=prompt,
                                       steps=steps, guidance=guidance, inner_steps=inner_steps,
                                       encode_seconds=encode_s, callback=_progress(bar, sd))
        finally:
            bar.close()
        text = cmp.csv_text(rows)
        fig = table(rows, f"Inversion methods, {steps} steps, guidance {guidance:g}: {prompt[:60]!r}", images[1:])
        png, csv_path = _write_outputs(fig, text, filename_prefix, "nulltext/compare")
        log.info("method comparison written to %s and %s", png, csv_path)
        return {"ui": {"text": [text]}, "result": (_image_of(fig), text, bchw_to_image(torch.cat(images)))}


NODE_CLASS_MAPPINGS = {
    "NullTextInvert": NullTextInvert,
    "SaveInversion": SaveInversion,
    "LoadInversion": LoadInversion,
    "NullTextEdit": NullTextEdit,
    "NullTextSDEdit": NullTextSDEdit,
    "FidelityCurve": FidelityCurve,
    "CompareInversionMethods": CompareInversionMethods,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NullTextInvert": "NULL-text Invert",
    "SaveInversion": "Save Inversion (NULL-text)",
    "LoadInversion": "Load Inversion (NULL-text)",
    "NullTextEdit": "NULL-text Edit (prompt-to-prompt)",
    "NullTextSDEdit": "NULL-text SDEdit",
    "FidelityCurve": "Fidelity Curve (LPIPS vs CLIP)",
    "CompareInversionMethods": "Compare Inversion Methods",
}
