"""The supplement's fidelity/editability measurement: LPIPS to the source (fidelity) versus CLIP distance to the
target prompt (editability) over a sweep of edits, as rows and CSV text (the plot of the rows: render.py).

One implementation for the ``FidelityCurve`` node (nodes/nulltext.py) and the ``fidelity`` subcommand (cli/fidelity.py):
each caller lists its ``Run``s (Blended Diffusion over skip_timesteps from ``blended_runs`` here; SDEdit over t0
from models/inversion.py's ``sdedit_runs``, with the host's Stable Diffusion), then ``sweep`` makes and measures
them in order. Pure torch: nothing here imports ComfyUI. Images are [B, 3, H, W] in 0..1, masks [B|1, H, W] in 0..1.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEADER = ("method", "parameter", "value", "lpips", "clip_distance")
BLENDED = "Blended Diffusion"


@dataclass(frozen=True)
class Row:
    """One measured point: a CSV line."""
    method: str
    parameter: str
    value: float
    lpips: float
    clip_distance: float


@dataclass
class Run:
    """One point of a sweep to make: ``make()`` returns its result [1, 3, H, W] in 0..1."""
    method: str
    parameter: str
    value: float
    make: Callable[[], torch.Tensor]


def parse_values(text: str, name: str, lo: float, hi: float) -> list[float]:
    """"0.2, 0.4 0.6" → [0.2, 0.4, 0.6], each in [lo, hi]; ValueError naming ``name`` otherwise."""
    try:
        vals = [float(v) for v in re.split(r"[,\s]+", str(text).strip()) if v]
    except ValueError:
        raise ValueError(f"{name} = {text!r}: give numbers separated by commas") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise ValueError(f"{name} = {text!r}: give one or more values, each in [{lo:g}, {hi:g}]")
    return vals


def measure(images: torch.Tensor, source: torch.Tensor, clip, prompt: str,
            mask: torch.Tensor | None) -> list[tuple[float, float]]:
    """(LPIPS to the source over the whole image, CLIP distance to the prompt inside the mask, or over the whole
    image without one) per image."""
    from .metrics import clip_distance, lpips_distance
    if source.shape[-2:] != images.shape[-2:]:
        source = F.interpolate(source.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    lp = lpips_distance(images, source)
    dist = clip_distance(clip, images, mask, prompt)
    return [(float(lp[i]), float(dist[i])) for i in range(images.shape[0])]


def blended_runs(ddpm, guide, source: torch.Tensor, mask: torch.Tensor, skips: list[int], *, seed: int,
                 ddim: bool = False, context: float = 0.25, callback=None) -> list[Run]:
    """Blended Diffusion of ``source`` under ``mask`` (``guide`` carries the CLIP model and the prompt), one run
    per skip_timesteps value, all from the same seed; ``context`` as for edit()."""
    from .edit import edit

    def make(s: int) -> Callable[[], torch.Tensor]:
        return lambda: edit(ddpm, source, mask, guide, skip_timesteps=s, seed=seed, ddim=ddim, context=context,
                            callback=callback)
    return [Run(BLENDED, "skip_timesteps", int(s), make(int(s))) for s in skips]


def sweep(runs: list[Run], source: torch.Tensor, clip, prompt: str,
          mask: torch.Tensor | None) -> Iterator[tuple[Row, torch.Tensor]]:
    """Make and measure each run in order: yields (row, result [1, 3, H, W] in 0..1 on the CPU)."""
    for run in runs:
        img = run.make().detach().float().cpu()
        (lp, dist), = measure(img, source, clip, prompt, mask)
        yield Row(run.method, run.parameter, run.value, lp, dist), img


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(HEADER)
    for r in rows:
        wr.writerow([r.method, r.parameter, f"{r.value:g}", f"{r.lpips:.6f}", f"{r.clip_distance:.6f}"])
    return buf.getvalue()
