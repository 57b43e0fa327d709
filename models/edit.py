"""The whole edit at any resolution: validate, crop around the mask, run the blended loop in
batches (split on out-of-memory), paste back. Images are [B, 3, H, W] in 0..1, masks [B|1, H, W]."""
from __future__ import annotations

import contextlib
import gc
import logging
import math

import torch

from .blended import StepCallback, blended_diffusion, generators
from .ddpm import ddim_invert_pixel
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


def check_skip(skip_timesteps: int, steps: int, *, name: str = "skip_timesteps", schedule: str | None = None) -> int:
    """``skip_timesteps`` leaves at least one of ``steps`` denoising steps (``schedule``: how the caller names
    where the steps come from); returns the number left to run. ValueError naming ``name`` otherwise."""
    if 0 <= skip_timesteps < steps:
        return steps - skip_timesteps
    where = f"{schedule} ({steps} steps)" if schedule else f"{steps} steps"
    nothing = " leaves nothing to do" if skip_timesteps >= steps else ""
    raise ValueError(f"{name} = {skip_timesteps} with {where}{nothing}: it must be in 0..{steps - 1} "
                     f"(it leaves {steps} - skip steps to run)")


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
    check_skip(skip_timesteps, ddpm.num_steps)
    if batch_size < 1:
        raise ValueError(f"batch size = {batch_size}: it must be at least 1 "
                         "(large batches are split automatically)")
    return image, mask


STARTS = ("noise", "fixed", "ddim_inversion")


def run_steps(ddpm, images: int, skip_timesteps: int, batch_size: int, *, max_batch: int = 64,
              start: str = "noise") -> int:
    """How many times ``edit`` calls its callback for these settings (the progress total): k denoising
    steps per batch of at most ``max_batch`` results, plus k inversion steps per image for
    ``start="ddim_inversion"``. An out-of-memory split adds k per extra batch (the callback's total grows)."""
    k = ddpm.num_steps - skip_timesteps
    return images * k * (math.ceil(batch_size / max_batch) + (start == "ddim_inversion"))


def start_noise(size: int, noise_seed: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The fixed ε of ``start="fixed"``: [1, 3, size, size] drawn first from noise_seed's CPU generator
    (pass ``generator`` to keep drawing from the same stream afterwards, as NoiseImage's preview does)."""
    gen = generator or seeded(noise_seed)
    return torch.randn((1, 3, size, size), generator=gen)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & (2**63 - 1))


def inversion_label(ddpm, class_label: int | None) -> torch.Tensor | None:
    """The class a deterministic inversion uses: class-conditional models need a fixed one."""
    if ddpm.num_classes is None:
        return None
    if class_label is None or not 0 <= class_label < ddpm.num_classes:
        raise ValueError(f"a class-conditional model needs a fixed class_label in 0..{ddpm.num_classes - 1} "
                         "for a deterministic inversion (and the same label in the edit)")
    return torch.full((1,), class_label, dtype=torch.long, device=ddpm.device)


def start_state(ddpm, source: torch.Tensor, k: int, start: str, *, noise_seed: int = 0,
                class_label: int | None = None, callback: StepCallback | None = None) -> torch.Tensor | None:
    """x_k for one working crop ``source`` [1, 3, S, S] in [−1, 1]: None for "noise" (each result draws
    its own in blended_diffusion), q_sample with the fixed ε of noise_seed for "fixed", the DDIM inversion
    of the source for "ddim_inversion"."""
    if start == "noise":
        return None
    if start == "fixed":
        return ddpm.q_sample(source, k - 1, start_noise(ddpm.image_size, noise_seed).to(source.device))
    return ddim_invert_pixel(ddpm, source, k, inversion_label(ddpm, class_label), callback)


def edit(ddpm, image: torch.Tensor, mask: torch.Tensor | None, guide: Guide, *,
         skip_timesteps: int = 25, seed: int = 404, batch_size: int = 1, ddim: bool = False,
         blend: bool = True, enforce_background: bool = True, class_label: int | None = None,
         context: float = 0.25, max_batch: int = 64, start: str = "noise", noise_seed: int = 0,
         x_start: torch.Tensor | None = None, callback: StepCallback | None = None,
         on_oom=None) -> torch.Tensor:
    """Text-driven edit of every image in ``image``: ``batch_size`` results per image, returned as
    [B·batch_size, 3, H, W] in 0..1. Result j of image b uses the generator (seed, b·batch_size + j).
    With ``blend=False`` this is Algorithm 1 (local CLIP-guided diffusion).

    The start state x_k of each image's results (``start``): "noise" = q_sample with each result's own
    noise (the paper), "fixed" = the same ε for every result, drawn from ``noise_seed``, "ddim_inversion" =
    the deterministic DDIM inversion of the source (k more UNet calls; class-conditional models need
    ``class_label``). ``x_start`` [batch_size, 3, S, S] gives x_k directly (every image starts from it).
    ``callback(done, total, x)`` after every step of the run (total: ``run_steps``).
    ``on_oom(device) -> bool``: the host's memory release, asked once at the first out-of-memory; True (it freed
    something) retries the same batch first."""
    if start not in STARTS:
        raise ValueError(f"start = {start!r}: use one of {', '.join(STARTS)}")
    image, mask = check_inputs(image, mask, ddpm, skip_timesteps, batch_size)
    if x_start is not None:
        if start != "noise":
            raise ValueError(f"give either x_start or start = {start!r}, not both")
        want = (3, ddpm.image_size, ddpm.image_size)
        if x_start.ndim != 4 or x_start.shape[0] not in (1, batch_size) or tuple(x_start.shape[1:]) != want:
            raise ValueError(f"x_start must be [1 or batch_size={batch_size}, {want[0]}, {want[1]}, {want[2]}] "
                             f"(the model's resolution), got {tuple(x_start.shape)}")
    if start == "ddim_inversion":
        inversion_label(ddpm, class_label)  # refused before any work
    device, size, k = ddpm.device, ddpm.image_size, ddpm.num_steps - skip_timesteps
    progress = [0, run_steps(ddpm, image.shape[0], skip_timesteps, batch_size, max_batch=max_batch, start=start)]

    def step_done(_step, _total, x):
        progress[0] += 1
        progress[1] = max(progress)
        if callback is not None:
            callback(progress[0], progress[1], x)

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
            x_k = x_start if x_start is not None else start_state(
                ddpm, source, k, start, noise_seed=noise_seed, class_label=class_label, callback=step_done)
            if x_k is not None:
                x_k = x_k.expand(batch_size, -1, -1, -1)
            done, chunk, host_asked = 0, min(batch_size, max_batch), on_oom is None
            while done < batch_size:
                n = min(chunk, batch_size - done)
                try:
                    x0 = blended_diffusion(
                        ddpm, source.expand(n, -1, -1, -1), m_small, guide, k,
                        generators(seed, b * batch_size + done, n), ddim=ddim, blend=blend,
                        enforce_background=enforce_background, class_label=class_label,
                        x_start=None if x_k is None else x_k[done:done + n].to(device).clone(),
                        callback=step_done)
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
                    progress[1] += k * (math.ceil((batch_size - done) / chunk) - math.ceil((batch_size - done) / n))
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


def pixel_x_start(ddpm, image: torch.Tensor, mask: torch.Tensor | None, skip_timesteps: int, *,
                  batch_size: int = 1, context: float = 0.25, class_label: int | None = None,
                  callback: StepCallback | None = None) -> torch.Tensor:
    """The ``x_start`` of ``start="ddim_inversion"`` on its own: the DDIM inversion of the very crop
    edit() works on, repeated batch_size times. image [1, 3, H, W] in 0..1 (one image); mask as for edit()."""
    image, mask = check_inputs(image, mask, ddpm, skip_timesteps, batch_size)
    if image.shape[0] != 1:
        raise ValueError(f"{image.shape[0]} images: invert one image at a time (edit() starts every "
                         "image from the same x_start)")
    size = ddpm.image_size
    source = crop(image.to(ddpm.device), plan_box(mask[0].cpu(), size, context), size) * 2 - 1
    x = start_state(ddpm, source, ddpm.num_steps - skip_timesteps, "ddim_inversion", class_label=class_label,
                    callback=callback)
    return x.expand(batch_size, -1, -1, -1).clone()
