"""The supplement's fidelity/editability measurement: LPIPS to the source (fidelity) versus CLIP distance to the
target prompt (editability) over a sweep of edits, as rows, CSV text and a plot.

One implementation for the ``FidelityCurve`` node (nodes/nulltext.py) and the ``fidelity`` subcommand (cli.py):
each caller lists its ``Run``s (Blended Diffusion over skip_timesteps from ``blended_runs`` here; SDEdit over t0
from nodes/nulltext.py, which needs the host's Stable Diffusion), then ``sweep`` makes and measures them in order.
Pure torch + PIL: nothing here imports ComfyUI. Images are [B, 3, H, W] in 0..1, masks [B|1, H, W] in 0..1.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEADER = ("method", "parameter", "value", "lpips", "clip_distance")
BLENDED = "Blended Diffusion"
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
PLOT_SIZE = (720, 520)


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


def label(parameter: str, value: float) -> str:
    """A point's label on the plot: t0=0.4, skip=20."""
    return f"{'skip' if parameter == 'skip_timesteps' else parameter}={value:g}"


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
                 ddim: bool = False, callback=None) -> list[Run]:
    """Blended Diffusion of ``source`` under ``mask`` (``guide`` carries the CLIP model and the prompt), one run
    per skip_timesteps value, all from the same seed."""
    from .edit import edit

    def make(s: int) -> Callable[[], torch.Tensor]:
        return lambda: edit(ddpm, source, mask, guide, skip_timesteps=s, seed=seed, ddim=ddim, callback=callback)
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


def figure(rows: list[Row], prompt: str, size=PLOT_SIZE):
    """The plot of a sweep's rows (PIL RGB image), one line per method."""
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(r.method, []).append((label(r.parameter, r.value), r.lpips, r.clip_distance))
    return plot(series, f"Fidelity vs editability: {prompt[:60]!r}", size)


def plot(series: dict[str, list[tuple[str, float, float]]], title: str, size=PLOT_SIZE):
    """Fidelity (x: LPIPS to the source) versus editability (y: CLIP distance to the target) as a PIL RGB
    image: one line per series, each point labelled with its parameter."""
    from PIL import Image, ImageDraw, ImageFont
    W, H = size
    left, right, top, bottom = 80, 20, 40, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    pts = [(x, y) for s in series.values() for _, x, y in s if math.isfinite(x) and math.isfinite(y)]
    xs, ys = [p[0] for p in pts] or [0.0, 1.0], [p[1] for p in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 0.05, (y1 - y0) * 0.08 or 0.05
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for i in range(6):
        fx, fy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, _ = px(fx, y0)
        _, gy = px(x0, fy)
        d.line([gx, top, gx, H - bottom], fill=(225, 225, 225))
        d.line([left, gy, W - right, gy], fill=(225, 225, 225))
        d.text((gx - 14, H - bottom + 6), f"{fx:.3f}", fill=(0, 0, 0), font=font)
        d.text((8, gy - 6), f"{fy:.4f}", fill=(0, 0, 0), font=font)
    d.text((left, H - 22), "LPIPS to the source (lower = more faithful)", fill=(0, 0, 0), font=font)
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    d.text((left, 22), "y: CLIP distance to the target prompt (lower = closer to the prompt)", fill=(0, 0, 0),
           font=font)
    for n, (name, s) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        line = [px(x, y) for _, x, y in s if math.isfinite(x) and math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        for (text, x, y), p in zip([q for q in s if math.isfinite(q[1]) and math.isfinite(q[2])], line):
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=color)
            d.text((p[0] + 6, p[1] - 12), text, fill=color, font=font)
        ly = top + 8 + 16 * n
        d.rectangle([W - right - 200, ly, W - right - 188, ly + 10], fill=color)
        d.text((W - right - 182, ly - 1), name, fill=(0, 0, 0), font=font)
    return im
