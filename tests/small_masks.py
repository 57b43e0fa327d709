"""How much of the model's square a small mask gets (issue 11, point 9): a square mask of 4, 20 and 100 px in
the middle of a 2000x2000 image, with the default context (0.25) and a 256 px model. "Before": the working
square was never smaller than the model size (plan_box with max_zoom=1); "now": the mask's box plus context,
enlarged to the model size up to MAX_ZOOM times. Share = the mean of the mask as the model sees it (the crop
resized to 256²). Prints the README's table (Limits and errors):

    /work/venv/bin/python tests/small_masks.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
import torch  # noqa: E402

from blended_diffusion.models.region import MAX_ZOOM, crop, plan_box  # noqa: E402

SIZES = (4, 20, 100)


def seen_by_model(mask_side: int, max_zoom: float = MAX_ZOOM, image_side: int = 2000, size: int = 256,
                  context: float = 0.25) -> tuple[int, float, float]:
    """(square side in source px, mask side in model px, share of the model's size² the mask covers)."""
    mask = torch.zeros(image_side, image_side)
    a = (image_side - mask_side) // 2
    mask[a:a + mask_side, a:a + mask_side] = 1
    box = plan_box(mask, size, context, max_zoom=max_zoom)
    seen = crop(mask[None, None], box, size)
    return box.side, mask_side * size / box.side, float(seen.mean())


def pct(share: float) -> str:
    return f"{share * 100:.2g} %"


def table() -> str:
    rows = ["| mask (px, in a 2000² image) | working square before → now (source px) | mask at 256 px before → now "
            "| share of the model's 256² before → now |", "|---|---|---|---|"]
    for n in SIZES:
        (s0, p0, f0), (s1, p1, f1) = seen_by_model(n, 1), seen_by_model(n)
        rows.append(f"| {n}×{n} | {s0} → {s1} | {p0:.0f} px → {p1:.0f} px | {pct(f0)} → {pct(f1)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
