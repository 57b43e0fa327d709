"""Image-editing metrics: one implementation for Evaluate Edit (apps.evaluate), the fidelity curve
(fidelity.measure: FidelityCurve and the ``fidelity`` command) and the ``bench`` command.

Images are [B, 3, H, W] in 0..1, masks [B|1, H, W] (or [B|1, 1, H, W]) in 0..1 with 1 = edited.

The pack's own scores:
- ``clip_distance``: D_CLIP of each image under the mask (the ranking score; background 0 in [-1, 1]);
- ``lpips_distance``: LPIPS (the pack's ``lpips`` package path, ``guidance.lpips_model``).

PIE-Bench's metrics (Ju et al., "Direct Inversion", the benchmark's published evaluation), per image:
- background ("unedited part") PSNR / LPIPS / MSE / SSIM: both images multiplied by (1 − mask), then the
  metric over the whole frame (so the mean runs over every pixel, the edited ones counting as equal black);
  NaN when the mask leaves no unedited pixel. PSNR and SSIM are torchmetrics' (data range 1, SSIM with its
  11×11 Gaussian window, σ 1.5); an exactly kept background gives MSE 0 and PSNR inf, as PIE-Bench reports;
- CLIP similarity of the whole target image and of the edited region (image × mask, black elsewhere) with
  the target prompt: 100 · max(cos, 0), as torchmetrics' CLIPScore (CLIP's own resize + centre crop);
- structure distance: MSE between the DINO-ViT self-similarity matrices (cosine similarity of the last
  block's keys, heads concatenated) of the source and the result. As the reference evaluation does, the
  images go into DINO's ImageNet normalisation with pixel values 0..255 (it skips the division by 255);
  kept so the numbers compare with the published table.
Pure torch (+ torchmetrics, lpips); nothing here imports ComfyUI.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LPIPS_NETS = ("vgg", "alex", "squeeze")
PIE_LPIPS_NET = "squeeze"  # the LPIPS network PIE-Bench's evaluation uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Column names as in PIE-Bench's evaluation script (its CSV header), in its order.
PIE_COLUMNS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part",
               "ssim_unedit_part", "clip_similarity_target_image", "clip_similarity_target_image_edit_part")


def mask4(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask as [B|1, 1, H, W] float on ``like``'s device and dtype."""
    m = mask.reshape(-1, 1, *mask.shape[-2:]).to(like)
    if m.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} but the image is "
                         f"{like.shape[-1]}x{like.shape[-2]}")
    return m


def unedited(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images with the edited region (mask 1) set to 0: what the background metrics compare."""
    return images * (1 - mask4(mask, images))


# --- the pack's scores ---------------------------------------------------------------------------------------
@torch.no_grad()
def clip_distance(clip, images: torch.Tensor, mask: torch.Tensor | None, prompt: str) -> torch.Tensor:
    """D_CLIP of each image under the mask (no augmentations), with CLIP's own normalisation
    (the official ranking skips it). Lower is better. Returns [B] float32 on the CPU."""
    from .clip import d_clip
    x = images.to(clip.device).float() * 2 - 1
    if mask is not None:
        m = mask.to(x).reshape(-1, 1, *mask.shape[-2:])
        if m.shape[-2:] != x.shape[-2:]:
            m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = x * m
    with torch.inference_mode(False):
        return d_clip(clip.encode_image(clip.preprocess(x)), clip.encode_text(prompt)).cpu()


@torch.no_grad()
def lpips_distance(images: torch.Tensor, reference: torch.Tensor, net: str = "vgg") -> torch.Tensor:
    """LPIPS of each image to the reference (one, or one per image), on the CPU. Returns [B]."""
    from .guidance import lpips_model
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS network {net!r} unknown: use one of {', '.join(LPIPS_NETS)}")
    with torch.inference_mode(False):
        x = images.detach().float().cpu()
        return lpips_model(net)(x * 2 - 1, reference.detach().float().cpu().expand_as(x) * 2 - 1).flatten()


# --- PIE-Bench ------------------------------------------------------------------------------------------------
def _pairs(images: torch.Tensor, reference: torch.Tensor, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.detach().to("cpu", dtype).contiguous()
    r = reference.detach().to("cpu", dtype).expand_as(x).contiguous()
    return x, r


def mse(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image to the reference over all its values (torchmetrics). [B] float64."""
    from torchmetrics.functional import mean_squared_error
    x, r = _pairs(images, reference)
    return torch.stack([mean_squared_error(a, b) for a, b in zip(x, r)])


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for data range 1 (torchmetrics); inf for an identical image. [B] float64."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    x, r = _pairs(images, reference)
    return peak_signal_noise_ratio(x, r, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM for data range 1 (torchmetrics' defaults: Gaussian window 11, σ 1.5); 1 for an identical image.
    In float32, as PIE-Bench computes it (float64 costs ten times as much here). [B] float32."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    x, r = _pairs(images, reference, torch.float32)
    return structural_similarity_index_measure(x, r, data_range=1.0, reduction="none").reshape(-1)


def background(images: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
               lpips_net: str = PIE_LPIPS_NET) -> dict[str, list[float]]:
    """PIE-Bench's unedited-part PSNR / LPIPS / MSE / SSIM of each image against the source: both multiplied
    by (1 − mask) first. NaN for an image whose mask covers everything (no unedited part)."""
    images, source = images.detach().cpu().double(), source.detach().cpu().double()
    m = mask4(mask, images)
    x, s = unedited(images, m), unedited(source.expand_as(images), m)
    empty = [(1 - mi).sum().item() == 0 for mi in m.expand(images.shape[0], -1, -1, -1)]
    out = {"psnr_unedit_part": psnr(x, s), "lpips_unedit_part": lpips_distance(x, s, lpips_net),
           "mse_unedit_part": mse(x, s), "ssim_unedit_part": ssim(x, s)}
    return {k: [math.nan if e else float(v) for v, e in zip(vals, empty)] for k, vals in out.items()}


@torch.no_grad()
def clip_similarity(clip, images: torch.Tensor, prompt: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLIPScore-style similarity of each image (times the mask, black elsewhere, when given) to the prompt:
    100 · max(cos, 0). The image is centre-cropped to a square and resized to CLIP's input, as CLIP's own
    preprocessing does. [B] float32 on the CPU."""
    x = images.detach().float().to(clip.device)
    if mask is not None:
        x = x * mask4(mask, x)
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    with torch.inference_mode(False):
        cos = (clip.encode_image(clip.preprocess(x * 2 - 1)) * clip.encode_text(prompt)).sum(-1)
    return (100 * cos.clamp(min=0)).cpu()


@torch.no_grad()
def structure_distance(dino, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PIE-Bench's structure distance: MSE between the DINO self-similarity matrices of the last block's keys
    of each image and of the reference. Pixel values 0..255 go into the ImageNet normalisation, as in the
    reference evaluation (see the module docstring). [B] float32 on the CPU."""
    def keys_self_similarity(x):  # x [1, 3, H, W] in 0..1
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        s, l = 224, int(224 * long / short)
        if l > 480:  # torchvision Resize(224, max_size=480)
            s, l = int(480 * short / long), 480
        size = (s, l) if h <= w else (l, s)
        x = F.interpolate(x * 255, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        k = F.normalize(dino.last_keys((x - mean) / std)[0], dim=-1, eps=1e-8)
        return k @ k.T

    with torch.inference_mode(False):
        out = []
        for a, b in zip(images.detach().float(), reference.detach().float().expand_as(images)):
            sa = keys_self_similarity(a[None].to(dino.device))
            sb = keys_self_similarity(b[None].to(dino.device))
            out.append(F.mse_loss(sa, sb).float().cpu())
    return torch.stack(out)


def pie_bench(result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None, clip, prompt: str,
              dino=None, lpips_net: str = PIE_LPIPS_NET) -> list[dict[str, float | None]]:
    """PIE-Bench's metrics of each result against the source (``PIE_COLUMNS``): ``mask`` is the edited region
    (None: the whole image, so no background metrics); without ``dino`` the structure distance is None.
    ``result`` and ``source`` should be what the image files hold (8-bit values), as PIE-Bench reads them."""
    n = result.shape[0]
    if mask is None:
        mask = torch.ones(1, *result.shape[-2:])
    bg = background(result, source, mask, lpips_net)
    whole = clip_similarity(clip, result, prompt)
    edited = clip_similarity(clip, result, prompt, mask)
    no_edit = [mi.sum().item() == 0 for mi in mask4(mask, result.float()).expand(n, -1, -1, -1)]
    sd = structure_distance(dino, result, source) if dino is not None else None
    rows = []
    for i in range(n):
        rows.append({"structure_distance": None if sd is None else float(sd[i]),
                     **{k: v[i] for k, v in bg.items()},
                     "clip_similarity_target_image": float(whole[i]),
                     "clip_similarity_target_image_edit_part": math.nan if no_edit[i] else float(edited[i])})
    return rows
