"""The blended loop as nodes: NoiseImage (x_k), CLIPGuidedStep, MaskBlend, ExtendingAugment and
the sampler that repeats the step (Algorithms 1-3 of the paper)."""
from __future__ import annotations

import logging

import torch

from ..models import AugmentSettings, Guide, edit
from ..models.augment import extending_augmentations, random_homographies
from ..models.edit import check_inputs, run_steps, seeded, start_noise
from ..models.guidance import LOSS_TERMS
from .. import host
from .common import (AUGMENT_T, BLEND_T, CATEGORY, CLIP_T, CONTEXT_TIP, DDPM_T, MAX_SEED, NOISE_T, STEP_T,
                     BlendRule, GuidedStep, NoiseState, bchw_to_image, check_ranges, checked_image,
                     image_to_bchw, mask_to_bhw, same_device)

log = logging.getLogger(__name__)


def skip_for(num_steps: int, skip_timesteps: int, strength: float) -> int:
    """skip_timesteps, or from strength (fraction of the schedule re-noised) when strength > 0."""
    if strength > 0:
        skip_timesteps = round(num_steps * (1 - strength))
    skip = min(max(int(skip_timesteps), 0), num_steps - 1)
    if skip != skip_timesteps:
        log.warning("skip_timesteps %d is outside 0..%d for %d steps: using %d",
                    skip_timesteps, num_steps - 1, num_steps, skip)
    return skip


class NoiseImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The real image to edit (any size; a square around the mask "
                                           "is worked at the model's resolution)."}),
            "ddpm": (DDPM_T, {"tooltip": "The diffusion model (its schedule sets the noise level)."}),
            "skip_timesteps": ("INT", {"default": 25, "min": 0, "max": 999, "tooltip":
                "Steps skipped at the start: the loop starts from x_k with k = steps - skip. More skip "
                "keeps the result closer to the input; less gives the prompt more freedom (paper: 25 of 100)."}),
            "strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "If above 0, replaces skip_timesteps: the fraction of the schedule that is re-noised "
                "(SDEdit's strength; 0.75 with 100 steps = skip 25)."}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip":
                "Seed of the preview noise and of the fixed noise (when fixed_noise is on)."}),
            "fixed_noise": ("BOOLEAN", {"default": False, "tooltip":
                "On: every result starts from the same x_k drawn from noise_seed. Off: each result draws "
                "its own x_k from the sampler's seed (the paper's behaviour)."}),
            "ddim_inversion": ("BOOLEAN", {"default": False, "tooltip":
                "On: x_k is the deterministic DDIM inversion of the source (eta 0) instead of noise, so the "
                "sampler reconstructs the image where guidance leaves it alone. Costs k extra UNet passes; "
                "class-conditional models need a fixed class_label on the sampler."}),
        }}

    RETURN_TYPES = (NOISE_T, "IMAGE")
    RETURN_NAMES = ("noise", "preview")
    OUTPUT_TOOLTIPS = ("The start state x_k = q(x_k | x_0) for the sampler.",
                       "x_k of the whole image, to see how much of it the noise hides.")
    FUNCTION = "noise"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = "Noises the image to step k (the start of the blended loop; also SDEdit's start)."

    def noise(self, image, ddpm, skip_timesteps=25, strength=0.0, noise_seed=0, fixed_noise=False,
              ddim_inversion=False):
        check_ranges(NoiseImage, skip_timesteps=skip_timesteps, strength=strength, noise_seed=noise_seed)
        x = checked_image(image, "NoiseImage")
        skip = skip_for(ddpm.num_steps, skip_timesteps, strength)
        k = ddpm.num_steps - skip
        gen = seeded(noise_seed)
        fixed = start_noise(ddpm.image_size, noise_seed, gen) if fixed_noise else None  # first from the stream
        eps = torch.randn(x.shape, generator=gen)
        xk = ddpm.q_sample((x * 2 - 1).to(ddpm.device), k - 1, eps.to(ddpm.device)).cpu()
        state = NoiseState(image=x, skip_timesteps=skip, num_steps=ddpm.num_steps, noise=fixed,
                           invert=bool(ddim_inversion), noise_seed=int(noise_seed))
        return state, bchw_to_image((xk + 1) / 2)


class ExtendingAugment:
    @classmethod
    def INPUT_TYPES(cls):
        p = lambda d, tip: ("FLOAT", {"default": d, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": tip})  # noqa: E731
        return {"required": {
            "num_views": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip":
                "Augmented views of the masked x̂0 whose CLIP loss is averaged (1 = no augmentation; "
                "the paper uses 8-16). More views: fewer adversarial results, more memory."}),
            "degrees": ("FLOAT", {"default": 15.0, "min": 0.0, "max": 180.0, "step": 1.0,
                                  "tooltip": "Random affine: rotation range in degrees (±)."}),
            "translate": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                                    "tooltip": "Random affine: shift range as a fraction of the size (±)."}),
            "affine_p": p(0.7, "Probability of the random affine per view."),
            "distortion": p(0.7, "Random perspective: how far corners may move (fraction of half the size)."),
            "perspective_p": p(0.7, "Probability of the random perspective per view."),
            "preview_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                     "tooltip": "Seed of the preview's random views (the sampler draws its own)."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Image to show the views of (first of the batch); a grid if "
                                           "unconnected."}),
        }}

    RETURN_TYPES = (AUGMENT_T, "IMAGE")
    RETURN_NAMES = ("augment", "views")
    OUTPUT_TOOLTIPS = ("Augmentation settings for CLIPGuidedStep.", "The views CLIP would see (224 px).")
    FUNCTION = "settings"
    CATEGORY = f"{CATEGORY}/guidance"
    DESCRIPTION = "Extending augmentations (paper §4.2.2): random affine + perspective views for the CLIP loss."

    def settings(self, num_views=8, degrees=15.0, translate=0.1, affine_p=0.7, distortion=0.7,
                 perspective_p=0.7, preview_seed=0, image=None):
        check_ranges(ExtendingAugment, num_views=num_views, degrees=degrees, translate=translate,
                     affine_p=affine_p, distortion=distortion, perspective_p=perspective_p,
                     preview_seed=preview_seed)
        s = AugmentSettings(num_views=num_views, degrees=degrees, translate=translate, affine_p=affine_p,
                            distortion=distortion, perspective_p=perspective_p)
        size = 224
        if image is None:
            yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            grid = (((yy // 28) + (xx // 28)) % 2).float() * 0.6 + 0.2
            x = torch.stack([grid, (xx / size), (yy / size)])[None]
        else:
            x = image_to_bchw(image[:1])
            h, w = x.shape[-2:]
            side = min(h, w)
            x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        gen = torch.Generator().manual_seed(int(preview_seed) & (2**63 - 1))
        mats = random_homographies(gen, s.num_views, size, s)[None]
        views = extending_augmentations(x.float().cpu(), mats)
        return s, bchw_to_image(views)


PAPER_TERMS = 4  # clip, range, lpips, l2: the widgets before 'fast'


def loss_widgets(terms) -> dict:
    """One FLOAT widget per guidance loss term (models.guidance.LOSS_TERMS)."""
    return {t.weight: ("FLOAT", {"default": t.node[0], "min": 0.0, "max": t.node[1], "step": t.node[2],
                                 "tooltip": t.node[3]}) for t in terms}


class CLIPGuidedStep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ddpm": (DDPM_T, {"tooltip": "The diffusion model that denoises."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                "What the masked region should become. Empty = no guidance: the region is filled to "
                "match its surroundings (object removal)."}),
            **loss_widgets(LOSS_TERMS[:PAPER_TERMS]),
            "fast": ("BOOLEAN", {"default": False, "tooltip":
                "Skip the backward pass through the UNet (gradient through x̂0's linear part only): "
                "about twice as fast, somewhat weaker guidance."}),
            **loss_widgets(LOSS_TERMS[PAPER_TERMS:]),  # after 'fast': saved workflows keep their positions
        }, "optional": {
            "clip": (CLIP_T, {"tooltip": "CLIP model for the prompt (needed unless the prompt is empty)."}),
            "augment": (AUGMENT_T, {"tooltip": "Extending augmentations; 8 default views if unconnected."}),
        }}

    RETURN_TYPES = (STEP_T,)
    RETURN_NAMES = ("step",)
    OUTPUT_TOOLTIPS = ("The guided denoising step the sampler repeats.",)
    FUNCTION = "step"
    CATEGORY = f"{CATEGORY}/guidance"
    DESCRIPTION = "One CLIP-guided denoising step: DDPM/DDIM update steered by the CLIP gradient of the masked x̂0."

    def step(self, ddpm, prompt="", fast=False, clip=None, augment=None, **weights):
        unknown = set(weights) - {t.weight for t in LOSS_TERMS}
        if unknown:
            raise TypeError(f"CLIPGuidedStep has no input {sorted(unknown)}; its loss weights are "
                            f"{[t.weight for t in LOSS_TERMS]}")
        weights = {t.weight: weights.get(t.weight, t.node[0]) for t in LOSS_TERMS}  # node defaults
        check_ranges(CLIPGuidedStep, **weights)
        if prompt.strip() and clip is None and weights["clip_lambda"] != 0:
            raise ValueError("CLIPGuidedStep: a prompt needs a CLIP model: connect a LoadCLIP node to "
                             "'clip', or clear the prompt for unguided filling (object removal)")
        guide = Guide(clip=clip, prompt=prompt.strip(), augment=augment or AugmentSettings(), fast=fast, **weights)
        return (GuidedStep(ddpm, guide),)


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur of a [B, H, W] mask over ``radius`` pixels (sigma = radius / 2)."""
    if radius <= 0:
        return mask
    from kornia.filters import gaussian_blur2d
    k = 2 * int(radius) + 1
    sigma = max(radius / 2, 0.5)
    return gaussian_blur2d(mask[:, None], (k, k), (sigma, sigma), border_type="replicate")[:, 0].clamp(0, 1)


class MaskBlend:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK", {"tooltip":
                "Region to edit: 1 = edited, 0 = kept exactly. With core LoadImage, the area you paint "
                "or erase in the mask editor (alpha 0) is the edited area."}),
            "invert": ("BOOLEAN", {"default": False, "tooltip":
                "Edit outside the mask instead (background replacement)."}),
            "feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1, "tooltip":
                "Soften the mask edge by a Gaussian blur of this many pixels; the edit then fades into "
                "the background (0 = hard edge as in the paper)."}),
            "enforce_background": ("BOOLEAN", {"default": True, "tooltip":
                "At the last step paste the clean source outside the mask (paper: on)."}),
        }, "optional": {
            "source": ("IMAGE", {"tooltip":
                "The image whose noised copy fills the background at every step; leave unconnected to "
                "use NoiseImage's image (they must be the same)."}),
        }}

    RETURN_TYPES = (BLEND_T, "MASK")
    RETURN_NAMES = ("blend", "mask")
    OUTPUT_TOOLTIPS = ("The per-step blend rule for the sampler.", "The mask actually used (after invert/feather).")
    FUNCTION = "blend"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = ("Blends the guided sample with the noised background at every step (Algorithm 2): "
                   "outside the mask the source is kept exactly.")

    def blend(self, mask, invert=False, feather=0, enforce_background=True, source=None):
        check_ranges(MaskBlend, feather=feather)
        m = mask_to_bhw(mask)
        if not torch.isfinite(m).all():
            log.warning("MaskBlend: the mask has NaN or infinite values: NaN counts as 0 (kept), inf as 1")
            m = torch.nan_to_num(m, nan=0.0, posinf=1.0, neginf=0.0)
        m = m.clamp(0, 1)
        if invert:
            m = 1 - m
        m = feather_mask(m, feather)
        if not (m > 0).any():
            log.warning("MaskBlend: the mask is empty, nothing will be edited. With LoadImage, open the "
                        "image in the mask editor and paint the region to change (or turn on invert)")
        src = None if source is None else image_to_bchw(source).clamp(0, 1)
        return BlendRule(mask=m, enforce_background=enforce_background, source=src), m.cpu()


class BlendedDiffusionSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise": (NOISE_T, {"tooltip": "Start state from NoiseImage (source image and skip_timesteps)."}),
            "step": (STEP_T, {"tooltip": "The guided step from CLIPGuidedStep."}),
            "seed": ("INT", {"default": 404, "min": 0, "max": MAX_SEED, "tooltip":
                "Random seed; result i depends only on (seed, i), so batch sizes can change freely."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                "Results per input image (the paper ranks a batch with CLIP). Split automatically on "
                "out-of-memory."}),
            "sampler": (["DDPM", "DDIM"], {"default": "DDPM", "tooltip":
                "DDPM: Algorithm 2 (stochastic). DDIM: Algorithm 3 (deterministic steps, eta 0; use a "
                "'ddimN' respacing)."}),
            "class_label": ("INT", {"default": -1, "min": -1, "max": 999, "tooltip":
                "Class of class-conditional models (ImageNet index); -1 = a random class each step "
                "(official code). Ignored by unconditional models."}),
        }, "optional": {
            "blend": (BLEND_T, {"tooltip":
                "MaskBlend rule (Algorithm 2/3). Unconnected: no blending, Algorithm 1 (local CLIP-guided "
                "diffusion) within 'mask'."}),
            "mask": ("MASK", {"tooltip":
                "Without a blend: the region the CLIP loss looks at and the result replaces (Algorithm "
                "1); whole image if unconnected. Ignored when a blend is connected."}),
            "context": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip": CONTEXT_TIP}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("batch_size results per input image, at the input's size.",)
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = "Runs the blended loop (Blended Diffusion) and returns the edited images."

    def sample(self, noise, step, seed=404, batch_size=4, sampler="DDPM", class_label=-1, blend=None, mask=None,
               context=0.25):
        check_ranges(BlendedDiffusionSampler, seed=seed, batch_size=batch_size, class_label=class_label,
                     context=context)
        ddpm, guide = step.ddpm, step.guide
        if noise.num_steps != ddpm.num_steps:
            raise ValueError(f"NoiseImage was made for {noise.num_steps} steps but CLIPGuidedStep's DDPM has "
                             f"{ddpm.num_steps}: connect the same LoadDDPM to both")
        image = noise.image
        if blend is not None:
            if mask is not None:
                log.warning("the sampler's mask input is ignored: the MaskBlend's mask is used")
            if blend.source is not None and (blend.source.shape != image.shape or
                                             not torch.equal(blend.source, image)):
                raise ValueError("MaskBlend's source differs from NoiseImage's image: connect the same "
                                 "image to both, or leave MaskBlend's source unconnected")
            m = blend.mask
        else:
            m = None if mask is None else mask_to_bhw(mask)
        image, m = check_inputs(image, m, ddpm, noise.skip_timesteps, batch_size)
        same_device(ddpm, guide.clip)
        bar = host.progress(run_steps(ddpm, image.shape[0], noise.skip_timesteps, batch_size, start=noise.start))

        def callback(done, total, x):
            bar.update(done, x, total)
            host.check_interrupt()

        try:
            out = edit(ddpm, image, m, guide, skip_timesteps=noise.skip_timesteps, seed=seed, batch_size=batch_size,
                       ddim=sampler == "DDIM", blend=blend is not None,
                       enforce_background=blend.enforce_background if blend is not None else False,
                       class_label=None if class_label < 0 else class_label, context=context,
                       start=noise.start, noise_seed=noise.noise_seed, callback=callback,
                       on_oom=host.on_out_of_memory)
        finally:
            bar.close()
            host.free_memory()
        return (bchw_to_image(out),)
