"""The whole edit at any resolution: validate, crop around the mask, run the blended loop in
batches (split on out-of-memory), paste back. Images are [B, 3, H, W] in 0..1, masks [B|1, H, W]."""
from __future__ import annotations

import contextlib
import gc
import logging

import torch

from .blended import StepCallback, blended_diffusion, generators
from .guidance import Guide
from .memory import OOM_FIXES, keeping_freed_memory, out_of_memory, return_freed_memory
from .region import crop, paste, plan_box

log = logging.getLogger(__name__)


@contextlib.contextmanager
def grad_mode():
    """Gradients work even when the caller runs under torch.inference_mode() (ComfyUI does)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_finite(x: torch.Tensor) -> None:
    """A sample that overflowed (huge guidance weights, fp16) is an error, not a black image."""
    if not torch.isfinite(x).all():
        raise ValueError("the sampler produced NaN or infinite values: lower clip_lambda / range_lambda / "
                         "the background weights, or use fp32 precision")


def check_inputs(image: torch.Tensor, mask: torch.Tensor | None, ddpm, skip_timesteps: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes, ranges and numbers, checked before any work; returns (image, mask) normalised."""
    if image.ndim != 4 or image.shape[1] not in (1, 3, 4):
        raise ValueError(f"image must be [B, C, H, W] with 1, 3 or 4 channels, got {tuple(image.shape)}")
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    elif image.shape[1] == 4:
        log.warning("image has an alpha channel: it is ignored (use the mask for the region)")
        image = image[:, :3]
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; check the node that produced it")
    if image.min() < -1e-3 or image.max() > 1 + 1e-3:
        log.warning("image values span [%.3g, %.3g], outside 0..1: clamped", image.min(), image.max())
    image = image.clamp(0, 1)
    h, w = image.shape[-2:]
    if mask is None:
        mask = torch.ones(1, h, w)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"mask must be [H, W] or [B, H, W], got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"{mask.shape[0]} masks for {image.shape[0]} images: give one mask, "
                         "or one per image")
    if mask.shape[-2:] != (h, w):
        log.warning("mask is %dx%d but the image is %dx%d: mask resized to the image",
                    mask.shape[-1], mask.shape[-2], w, h)
        mask = torch.nn.functional.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear",
                                               align_corners=False)[:, 0]
    mask = torch.nan_to_num(mask.float()).clamp(0, 1).to(image.device)
    steps = ddpm.num_steps
    if not 0 <= skip_timesteps < steps:
        raise ValueError(f"skip_timesteps = {skip_timesteps} with {steps} steps: it must be in "
                         f"0..{steps - 1} (it leaves {steps} - skip steps to run)")
    if batch_size < 1:
        raise ValueError(f"batch size = {batch_size}: it must be at least 1 "
                         "(large batches are split automatically)")
    return image, mask


def edit(ddpm, image: torch.Tensor, mask: torch.Tensor | None, guide: Guide, *,
         skip_timesteps: int = 25, seed: int = 404, batch_size: int = 1, ddim: bool = False,
         blend: bool = True, enforce_background: bool = True, class_label: int | None = None,
         context: float = 0.25, max_batch: int = 64, x_start: torch.Tensor | None = None,
         callback: StepCallback | None = None, on_oom=None) -> torch.Tensor:
    """Text-driven edit of every image in ``image``: ``batch_size`` results per image, returned as
    [B·batch_size, 3, H, W] in 0..1. Result j of image b uses the generator (seed, b·batch_size + j).
    With ``blend=False`` this is Algorithm 1 (local CLIP-guided diffusion). ``on_oom(device) -> bool``: the host's
    memory release, asked once at the first out-of-memory; True (it freed something) retries the same batch first."""
    image, mask = check_inputs(image, mask, ddpm, skip_timesteps, batch_size)
    device, size, k = ddpm.device, ddpm.image_size, ddpm.num_steps - skip_timesteps
    outputs = []
    with grad_mode(), keeping_freed_memory(device):
        ddpm.thaw()
        if guide.clip is not None:
            guide.clip.thaw()
        for b in range(image.shape[0]):
            img = image[b:b + 1].clone().to(device)
            m = mask[min(b, mask.shape[0] - 1)].clone().to(device)
            if not (m > 0).any():
                log.warning("image %d: the mask is empty, the image comes back unchanged", b)
                outputs.append(img.expand(batch_size, -1, -1, -1).cpu())
                continue
            box = plan_box(m.cpu(), size, context)
            source = crop(img, box, size) * 2 - 1
            m_small = crop(m[None, None], box, size)
            done, chunk, host_asked = 0, min(batch_size, max_batch), on_oom is None
            while done < batch_size:
                n = min(chunk, batch_size - done)
                try:
                    x0 = blended_diffusion(
                        ddpm, source.expand(n, -1, -1, -1), m_small, guide, k,
                        generators(seed, b * batch_size + done, n), ddim=ddim, blend=blend,
                        enforce_background=enforce_background, class_label=class_label,
                        x_start=None if x_start is None else x_start[done:done + n].to(device).clone(),
                        callback=callback)
                except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                    kind = out_of_memory(e)
                    if kind is None:
                        raise
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    if not host_asked:  # the host frees what it holds (other models) before the batch is split
                        host_asked = True
                        gc.collect()
                        if on_oom(device):
                            log.warning("out of memory at batch %d: the host freed memory, retrying", n)
                            continue
                    if n == 1 and kind == "sure":  # an OutOfMemoryError, so hosts run their own OOM handling
                        raise torch.OutOfMemoryError(
                            f"out of memory with a batch of 1: {OOM_FIXES} ({first})") from None
                    if n == 1:
                        raise RuntimeError(f"out of memory with a batch of 1, most likely: {OOM_FIXES} ({first}: "
                                           "oneDNN's error when it cannot allocate its memory)") from e
                    chunk = max(1, n // 2)
                    log.warning("%s at batch %d: retrying in batches of %d", "out of memory" if kind == "sure" else
                                f"{first} (usually out of memory)", n, chunk)
                    gc.collect()  # the failed attempt's tensors may sit in reference cycles (frames, tracebacks)
                    if torch.device(device).type == "cpu":
                        return_freed_memory()
                    elif torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                check_finite(x0)
                # Algorithm 1 without enforcement changes the whole working crop, not just the mask
                keep = m if (blend or enforce_background) else torch.ones_like(m)
                outputs.append(paste(img, (x0.detach() + 1) / 2, box, keep[None, None]).cpu())
                done += n
    return torch.cat(outputs)
