"""Applications: CLIP ranking of a batch, text-guided extrapolation, and evaluation of results."""
from __future__ import annotations

import json
import logging

import torch

from ..models import apps
from .. import host
from .common import (CATEGORY, CLIP_T, DDPM_T, MAX_SEED, bchw_to_image, check_ranges, checked_image,
                     image_to_bchw, mask_to_bhw, resize_mask, same_device)

log = logging.getLogger(__name__)
DIRECTIONS = ("left", "right", "up", "down")


def _per_result(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Repeat a batch of B sources/masks to n = B·k results (each source's results are adjacent)."""
    if x.shape[0] == n or x.shape[0] == 1:
        return x
    if n % x.shape[0]:
        raise ValueError(f"{x.shape[0]} {what}s for {n} images: give one {what}, one per image, or one "
                         "per input image of the sampler (its results come in equal groups)")
    return x.repeat_interleave(n // x.shape[0], dim=0)


class RankByCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The results to rank (e.g. the sampler's batch)."}),
            "clip": (CLIP_T, {"tooltip": "CLIP model that scores each image against the prompt."}),
            "prompt": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "Text the edited region should match (the edit's prompt)."}),
            "top_k": ("INT", {"default": 0, "min": 0, "max": 4096,
                              "tooltip": "Keep the k best images; 0 keeps them all (sorted)."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Score only the edited region (as the paper does); the whole image if "
                                         "unconnected."}),
        }}

    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("images", "scores", "report")
    OUTPUT_IS_LIST = (False, True, False)
    OUTPUT_TOOLTIPS = ("The images sorted best first.",
                       "Their CLIP distances to the prompt, best (lowest) first.",
                       "The ranking as text.")
    FUNCTION = "rank"
    OUTPUT_NODE = True  # its scores (ui text) are shown again when the run is cached
    CATEGORY = f"{CATEGORY}/applications"
    DESCRIPTION = "Ranks images by CLIP distance of the masked region to the prompt (paper §4.2.3), best first."

    def rank(self, images, clip, prompt="", top_k=0, mask=None):
        check_ranges(RankByCLIP, top_k=top_k)
        x = image_to_bchw(images)
        m = None if mask is None else _per_result(resize_mask(mask_to_bhw(mask), x.shape[-2:]), x.shape[0], "mask")
        host.load_models(clip)
        order, scores = apps.rank(clip, x, m, prompt.strip())
        if top_k > 0:
            order = order[:top_k]
        ranked = [float(scores[i]) for i in order]
        lines = [f"{r + 1}. image {int(i)}: CLIP distance {scores[i]:.4f}" for r, i in enumerate(order)]
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (bchw_to_image(x[order]), ranked, report)}


class Extrapolate:
    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "image": ("IMAGE", {"tooltip": "The image to extend (each of a batch is extended on its own)."}),
            "ddpm": (DDPM_T, {"tooltip": "The diffusion model that paints the new areas."}),
        }
        for d in DIRECTIONS:
            req[f"extend_{d}"] = ("BOOLEAN", {"default": d in ("left", "right"),
                                              "tooltip": f"Extend the image to the {d}."})
            req[f"prompt_{d}"] = ("STRING", {"default": "", "multiline": True, "tooltip":
                f"What the new area on the {d} should show; empty = extend without CLIP guidance."})
        req.update({
            "amount": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 8.0, "step": 0.05, "tooltip":
                "Growth per extended direction, as a fraction of the image's width (left/right) or "
                "height (up/down)."}),
            "seed": ("INT", {"default": 404, "min": 0, "max": MAX_SEED, "tooltip": "Random seed."}),
            "clip_lambda": ("FLOAT", {"default": 1000.0, "min": 0.0, "max": 100000.0, "step": 10.0,
                                      "tooltip": "Weight of the CLIP loss (paper: 1000)."}),
            "range_lambda": ("FLOAT", {"default": 50.0, "min": 0.0, "max": 10000.0, "step": 1.0,
                                       "tooltip": "Weight of the range loss (paper: 50)."}),
            "num_views": ("INT", {"default": 8, "min": 1, "max": 64,
                                  "tooltip": "Augmented views per CLIP evaluation."}),
            "sampler": (["DDPM", "DDIM"], {"default": "DDPM", "tooltip": "DDPM (Algorithm 2) or DDIM (Algorithm 3)."}),
        })
        return {"required": req, "optional": {
            "clip": (CLIP_T, {"tooltip": "CLIP model for the prompts (needed unless all prompts are empty)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The extended image (its original side scaled to the model's size).",)
    FUNCTION = "extrapolate"
    CATEGORY = f"{CATEGORY}/applications"
    DESCRIPTION = ("Text-guided extrapolation (paper supplement B.5.2): grows the image a quarter window at a "
                   "time with Blended Diffusion, each side under its own prompt.")

    def extrapolate(self, image, ddpm, amount=0.5, seed=404, clip_lambda=1000.0, range_lambda=50.0,
                    num_views=8, sampler="DDPM", clip=None, **sides):
        check_ranges(Extrapolate, amount=amount, seed=seed, clip_lambda=clip_lambda, range_lambda=range_lambda,
                     num_views=num_views)
        prompts = {d: sides.get(f"prompt_{d}", "").strip() for d in DIRECTIONS if sides.get(f"extend_{d}")}
        if not prompts:
            raise ValueError("Extrapolate: turn on at least one of extend_left/right/up/down")
        if any(prompts.values()) and clip is None:
            raise ValueError("Extrapolate: prompts need a CLIP model: connect LoadCLIP to 'clip', or clear "
                             "the prompts to extend without guidance")
        if clip is not None:
            same_device(ddpm, clip)
        bar = host.progress(1, "Extrapolate")

        def callback(step_done, total, x0):
            bar.update(step_done, x0, total=total)
            host.check_interrupt()

        images = checked_image(image, "Extrapolate")
        outs = []
        try:
            for b in range(images.shape[0]):
                x = images[b:b + 1]
                with torch.inference_mode(False):
                    x = x.clone()
                outs.append(apps.extrapolate(ddpm, clip, x, prompts, amount, seed=seed, clip_lambda=clip_lambda,
                                             range_lambda=range_lambda, num_views=num_views,
                                             ddim=sampler == "DDIM", callback=callback))
        finally:
            bar.close()
            host.free_memory()
        return (bchw_to_image(torch.cat(outs)),)


class BlendedDiffusionEvaluate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The results to evaluate."}),
            "source": ("IMAGE", {"tooltip": "The image that was edited (one, or one per input image)."}),
            "mask": ("MASK", {"tooltip": "The edited region, 1 = edited (use MaskBlend's mask output if you "
                                         "inverted or feathered)."}),
            "prompt": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "The edit's prompt; empty skips the CLIP distance."}),
        }, "optional": {
            "clip": (CLIP_T, {"tooltip": "CLIP model for the CLIP distance (skipped if unconnected)."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("JSON list, one object per image: clip_distance (lower is better), lpips_bg and "
                       "max_abs_bg outside the mask versus the source (0 = background exactly kept).",)
    FUNCTION = "evaluate"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/applications"
    DESCRIPTION = "Per result: CLIP distance to the prompt, LPIPS and max |difference| outside the mask."

    def evaluate(self, images, source, mask, prompt="", clip=None):
        x = image_to_bchw(images)
        n = x.shape[0]
        src = image_to_bchw(source)
        if src.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"source is {src.shape[-1]}x{src.shape[-2]} but the images are "
                             f"{x.shape[-1]}x{x.shape[-2]}: evaluate results against the image they were made from")
        src = _per_result(src, n, "source image")
        m = _per_result(resize_mask(mask_to_bhw(mask), x.shape[-2:]), n, "mask")
        if clip is not None and prompt.strip():
            host.load_models(clip)
        rows = apps.evaluate(x, src, m, clip, prompt.strip())
        report = json.dumps([{"index": i, **r} for i, r in enumerate(rows)], indent=1)
        return {"ui": {"text": [report]}, "result": (report,)}
