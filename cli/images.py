"""Image and mask files for the commands: models/imageio.py's readers (any mode at its real depth, EXIF
orientation, the first frame) with their errors as CLI errors, masks at the image's size, folders of images."""
from __future__ import annotations

import logging
from pathlib import Path

from . import CLIError

log = logging.getLogger("blended_diffusion.cli")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_image(path: str | Path, with_alpha: bool = False):
    """Image file → [1, 3, H, W] float in 0..1 (models/imageio.py: any mode at its real depth, EXIF
    orientation applied, the first frame); ``with_alpha``: also its opacity [H, W], None without
    transparency."""
    from ..models import imageio
    try:
        rgb, alpha = imageio.load_image(path)
    except (FileNotFoundError, imageio.ImageFileError) as e:
        raise CLIError(str(e)) from None
    return (rgb, alpha) if with_alpha else rgb


def transparent_region(alpha):
    """Pixels that are not fully opaque (numpy bool [H, W]) of an opacity map, or None if all are."""
    return None if alpha is None or not (alpha < 1).any() else (alpha < 1).numpy()


def load_mask(path: str | Path, size_hw: tuple[int, int], invert: bool = False):
    """Mask file → [1, H, W] float 0/1 at the image size (nearest resampling, as the official code).
    Which pixels are masked: models/imageio.py's mask_array."""
    import numpy as np
    import torch
    from PIL import Image

    from ..models import imageio
    try:
        m = imageio.load_mask(path)
    except (FileNotFoundError, imageio.ImageFileError) as e:
        raise CLIError(str(e)) from None
    h, w = size_hw
    if m.shape != (h, w):
        mh, mw = m.shape
        if abs(mh / mw - h / w) > 0.02:
            log.warning("mask %s is %dx%d but the image is %dx%d (another aspect ratio): stretched",
                        path, mw, mh, w, h)
        else:
            log.info("mask %s resized from %dx%d to the image's %dx%d (nearest)", path, mw, mh, w, h)
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    if invert:
        m = ~m
    return torch.from_numpy(m.astype(np.float32))[None]


def checked_mask(path: str, size_hw: tuple[int, int], invert: bool):
    """A mask file at the image size that selects at least one pixel."""
    mask = load_mask(path, size_hw, invert)
    if not (mask > 0).any():
        raise CLIError(f"the mask {path} selects no pixel" + (" after --invert_mask" if invert else "")
                       + ": paint the region to edit in white (any non-zero value) on black")
    return mask


def collect_images(items: list[str]) -> list[Path]:
    """Image files named directly or found in the folders named (sorted), at least one."""
    files: list[Path] = []
    for it in items:
        p = Path(it).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise CLIError(f"{it}: no such file or folder")
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_EXTS)}) in {', '.join(items)}")
    return files
