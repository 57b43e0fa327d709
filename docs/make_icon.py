"""Draws docs/icon.png, the pack's icon for the Comfy registry (made by the project, CC0): a photo-like gradient
square whose masked disc is blended in from another colour, the idea of Blended Diffusion.

    python docs/make_icon.py
"""
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256


def icon(size: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    background = np.stack([0.15 + 0.35 * x, 0.35 + 0.4 * y, 0.75 - 0.3 * x], -1)        # a blue-green "scene"
    edit = np.stack([0.95 - 0.2 * y, 0.45 + 0.25 * x, 0.25 + 0.1 * y], -1)              # the edited region
    r = np.hypot(x - 0.5, y - 0.55)
    mask = np.clip((0.30 - r) / 0.04, 0, 1)[..., None]                                  # a feathered disc
    img = edit * mask + background * (1 - mask)
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8), "RGB")


if __name__ == "__main__":
    out = Path(__file__).with_name("icon.png")
    icon().save(out, optimize=True)
    print(out)
