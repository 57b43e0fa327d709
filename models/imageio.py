"""Reading image and mask files, whatever their mode: one place for the command line (cli/images.py) and the
standalone runner's LoadImage (cli/runner.py). Pure PIL / numpy / torch, no ComfyUI.

Pillow's ``convert("RGB")`` clips 16- and 32-bit gray values to 8 bits (a 16-bit gray PNG comes out
almost white), so gray modes are scaled by their own range here: 8-bit /255, 16-bit /65535, float as is.
Colour modes (RGB, RGBA, palette, CMYK, 16-bit RGB, which Pillow reads as 8-bit) go through Pillow.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE = {"I": (65535.0, "32-bit integer", "16 bits"), "F": (1.0, "floating-point", "0..1")}  # I, F: full scale


class ImageFileError(ValueError):
    """A file that cannot be read as an image; the message names the file and what to do."""


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The file's first frame, decoded, with its EXIF orientation applied. An animation or a multi-page
    file logs a warning (camera MPO JPEGs, whose extra frame is a preview, do not)."""
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":
                log.warning("%s has %d frames: uses the first of %d frames (save the frame to edit as a "
                            "PNG to use another)", path, frames, frames)
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageFileError(f"{path}: not a readable image ({e}); save it as PNG, JPEG, WebP or TIFF") from None


def _wide(im: Image.Image, name) -> np.ndarray:
    """An 'I' (32-bit integer) or 'F' (float) image as float32 [H, W] in 0..1: values within the mode's
    usual range (0..65535, how Pillow holds many 16-bit files; 0..1 for float) are scaled by it, anything
    else from its own min..max, with a warning."""
    a = np.asarray(im, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ImageFileError(f"{name}: the image has NaN or infinite values; save it with finite values")
    full, kind, usual = WIDE[im.mode]
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= full:
        return (a / full).astype(np.float32)
    log.warning("%s: %s values span %g..%g, beyond %s: scaled from that range to 0..1", name, kind, lo, hi, usual)
    return ((a - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def gray_array(im: Image.Image, name="image") -> np.ndarray | None:
    """A gray image (1, L, LA, I;16*, I, F) as float32 [H, W] in 0..1 by its real range; None for colour."""
    if im.mode in ("1", "L", "LA"):
        return np.asarray(im.getchannel(0), dtype=np.float32) / (1 if im.mode == "1" else 255)
    if im.mode in SIXTEEN_BIT:
        return np.asarray(im, dtype=np.float32) / 65535
    if im.mode in WIDE:
        return _wide(im, name)
    return None


def alpha_array(im: Image.Image) -> np.ndarray | None:
    """Opacity as float32 [H, W] in 0..1 (an alpha band, or a palette / single-colour transparency), or
    None for an image without transparency data."""
    if "A" in im.getbands():
        return np.asarray(im.getchannel("A"), dtype=np.float32) / 255
    t = im.info.get("transparency")
    if t is None:
        return None
    if im.mode in ("P", "RGB"):
        return np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255
    if isinstance(t, int) and len(im.getbands()) == 1:  # gray: one value is transparent
        return (np.asarray(im) != t).astype(np.float32)
    return None


def rgb_array(im: Image.Image, name="image") -> np.ndarray:
    """Any mode as float32 RGB [H, W, 3] in 0..1 (gray repeated to three channels)."""
    gray = gray_array(im, name)
    if gray is not None:
        return np.repeat(gray[..., None], 3, axis=-1)
    try:
        rgb = im.convert("RGB")
    except ValueError as e:
        raise ImageFileError(f"{name}: {im.mode} images cannot be read as RGB ({e}); save it as an RGB "
                             "PNG or JPEG") from None
    return np.asarray(rgb, dtype=np.float32) / 255


def mask_array(im: Image.Image) -> np.ndarray:
    """Binary mask [H, W] (numpy bool). Without transparency any non-zero pixel is masked (the official
    rule; gray modes are read at their own depth, colour: any channel). With transparency ComfyUI's
    LoadImage rule (MASK = 1 − alpha): transparent or partly transparent pixels are masked, so masks
    painted in ComfyUI's mask editor work unchanged."""
    alpha = alpha_array(im)
    if alpha is not None and (alpha < 1).any():
        return alpha < 1
    if im.mode in ("1", "L", "LA", *SIXTEEN_BIT, *WIDE):
        return np.asarray(im.getchannel(0) if im.mode == "LA" else im) > 0
    return np.asarray(im.convert("RGB")).max(-1) > 0


def load_image(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image file → (RGB [1, 3, H, W] float32 in 0..1, opacity [H, W] in 0..1 or None without
    transparency)."""
    im = open_image(path)
    rgb = torch.from_numpy(rgb_array(im, path)).permute(2, 0, 1)[None].contiguous()
    alpha = alpha_array(im)
    return rgb, None if alpha is None else torch.from_numpy(alpha)


def load_mask(path: str | Path) -> np.ndarray:
    """Mask file → binary mask [H, W] (numpy bool) by ``mask_array``'s rules."""
    return mask_array(open_image(path, "mask"))
