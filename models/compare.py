"""A comparison of the inversion methods on one image: each method of models/inversion.py's ``METHODS`` inverts
the same latent with the same caption, steps and guidance, and its reconstruction is measured against the source
image (LPIPS, PSNR), the VAE's own round trip (PSNR) and the encoded source latent (MSE), with its wall-clock
seconds and its cost in eps calls (UNet invocations) and latents evaluated (the rows of those calls).

A first row "vae" is the VAE's encode → decode round trip alone: no inversion reconstructs the image better than
the decoder can draw it, so that row is the ceiling of every other one.

One implementation for the ``CompareInversionMethods`` node (nodes/nulltext.py) and ``fidelity
--compare-methods`` (cli/fidelity.py); the table image is render.py's ``table``. Pure torch (+ the pack's metrics):
nothing here imports ComfyUI. Images are [1, 3, H, W] in 0..1.
"""
from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields

import torch
import torch.nn.functional as F

from . import inversion as ni
from . import nulltext as nt
from .cond import Conditioning

HEADER = ("method", "lpips", "psnr_db", "seconds", "eps_calls", "eps_evaluations", "latent_mse", "psnr_vae_db")
VAE = "vae"
DEFAULT_METHODS = "null-text, null-text global, negative-prompt, direct"


@dataclass(frozen=True)
class Row:
    """One method's measurements (a CSV line): LPIPS and PSNR (dB) of its reconstruction to the source image,
    its seconds (the whole inversion: DDIM inversion, the method's pass, the reconstruction; not the VAE),
    eps calls and latents evaluated, the MSE of its reconstructed latent to the encoded source, and its PSNR
    (dB) to the VAE round trip."""
    method: str
    lpips: float
    psnr_db: float
    seconds: float
    eps_calls: int
    eps_evaluations: int
    latent_mse: float
    psnr_vae_db: float


def parse_methods(text: str) -> list[str]:
    """"null-text, direct" → ["null-text", "direct"] (comma separated, in the given order; case and extra
    spaces ignored). ValueError naming the allowed methods for an unknown one, a repeated one or none."""
    allowed = ", ".join(ni.METHODS)
    out = []
    for item in str(text or "").split(","):
        name = " ".join(item.split()).lower()
        if not name:
            continue
        if name not in ni.METHODS:
            raise ValueError(f"methods: {item.strip()!r} is not an inversion method: give a comma-separated list "
                             f"of {allowed}")
        if name in out:
            raise ValueError(f"methods: {name!r} is listed twice: give each method once")
        out.append(name)
    if not out:
        raise ValueError(f"methods is empty: give a comma-separated list of one or more of {allowed}")
    return out


class Counted:
    """A model (the core's protocol: ``eps``, ``device``, ``alphas_cumprod``, and whatever else it has, e.g. its
    family) whose eps calls are counted: ``calls`` (UNet invocations) and ``evaluations`` (latents evaluated,
    the rows of those calls)."""

    def __init__(self, model):
        self.model = model
        self.calls = self.evaluations = 0

    def __getattr__(self, name):  # device, alphas_cumprod, family, cond_kind, …
        return getattr(self.__dict__["model"], name)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.calls += 1
        self.evaluations += int(x.shape[0])
        return self.model.eps(x, t, cond)


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB (data range 1) of one image to the reference; inf when identical."""
    from .metrics import psnr
    return float(psnr(image, reference)[0])


def scores(source: torch.Tensor, image: torch.Tensor) -> tuple[float, float]:
    """(LPIPS, PSNR in dB) of ``image`` [1, 3, H, W] to ``source`` (resized to the image's size when the
    two differ), in 0..1."""
    from .metrics import lpips_distance
    source, image = source.detach().float().cpu(), image.detach().float().cpu()
    if source.shape[-2:] != image.shape[-2:]:
        source = F.interpolate(source, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return float(lpips_distance(image, source)[0]), psnr_db(image, source)


def total_steps(methods: list[str], steps: int, inner_steps: int) -> int:
    """The ``total`` of ``compare``'s callback: every method's ``invert_steps``, one after another."""
    return sum(ni.invert_steps(steps, inner_steps, method=m) for m in methods)


def measure(model, z0: torch.Tensor, cond: Conditioning, uncond: Conditioning, *, source: torch.Tensor,
            decode: Callable[[torch.Tensor], torch.Tensor], methods: list[str], prompt: str = "", steps: int = 50,
            guidance: float = 7.5, inner_steps: int = 10, encode_seconds: float = 0.0,
            callback: nt.Callback | None = None) -> Iterator[tuple[Row, torch.Tensor]]:
    """``compare``'s rows one by one, each with its image (the VAE round trip first): a caller that is stopped
    keeps the finished ones."""
    methods = list(methods)
    if not methods:
        raise ValueError("no inversion method to compare: give one or more of " + ", ".join(ni.METHODS))
    source = source.detach().float().cpu()
    total = total_steps(methods, steps, inner_steps)
    t = time.perf_counter()
    vae_image = decode(z0).detach().float().cpu()
    vae_s = encode_seconds + time.perf_counter() - t
    lp, ps = scores(source, vae_image)
    yield Row(VAE, lp, ps, round(vae_s, 3), 0, 0, 0.0, math.inf), vae_image
    done = 0
    for method in methods:
        counted = Counted(model)
        offset = done
        cb = None if callback is None else (lambda k, _n, z, o=offset: callback(o + k, total, z))
        t = time.perf_counter()
        _inv, rec = ni.invert(counted, z0, cond, uncond, prompt=prompt, source=source, steps=steps,
                              guidance=guidance, inner_steps=inner_steps, method=method, callback=cb)
        seconds = time.perf_counter() - t
        del _inv
        done += ni.invert_steps(steps, inner_steps, method=method)
        latent_mse = float(F.mse_loss(rec.detach().float().cpu(), z0.detach().float().cpu()))
        image = decode(rec).detach().float().cpu()
        lp, ps = scores(source, image)
        yield Row(method, lp, ps, round(seconds, 3), counted.calls, counted.evaluations, latent_mse,
                  psnr_db(image, vae_image)), image


def compare(model, z0: torch.Tensor, cond: Conditioning, uncond: Conditioning, *, source: torch.Tensor,
            decode: Callable[[torch.Tensor], torch.Tensor], methods: list[str], prompt: str = "", steps: int = 50,
            guidance: float = 7.5, inner_steps: int = 10, encode_seconds: float = 0.0,
            callback: nt.Callback | None = None) -> tuple[list[Row], list[torch.Tensor]]:
    """Invert the latent ``z0`` of ``source`` (the image the VAE encoded, [1, 3, H, W] in 0..1) with each of
    ``methods`` (``invert`` with ``steps``, ``guidance``, ``inner_steps``; ``cond`` / ``uncond``: the caption's
    and the empty prompt's conditionings) and measure each reconstruction (``decode``: latent → [1, 3, H, W] in
    0..1). The first row is "vae": ``decode(z0)``, its seconds ``encode_seconds`` (the caller's encode) plus the
    decode's, no eps call, latent MSE 0 (it is the source latent).

    ``callback(done, total, latent)`` after every step of every inversion (``total`` = ``total_steps``);
    raising from it (a cancel) stops the comparison. Returns (the rows, the images: the source, the VAE round
    trip, then one reconstruction per method, each [1, 3, H, W] on the CPU)."""
    rows, images = [], [source.detach().float().cpu()]
    for row, image in measure(model, z0, cond, uncond, source=source, decode=decode, methods=methods, prompt=prompt,
                              steps=steps, guidance=guidance, inner_steps=inner_steps,
                              encode_seconds=encode_seconds, callback=callback):
        rows.append(row)
        images.append(image)
    return rows, images


# --------------------------------------------------------------------------------------------- CSV
def _number(v) -> str:
    if isinstance(v, int):
        return str(v)
    return "inf" if math.isinf(v) and v > 0 else f"{v:.6g}"


def csv_text(rows: list[Row]) -> str:
    """The rows as CSV with the header ``HEADER`` (infinite PSNR written as inf)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(HEADER)
    for r in rows:
        wr.writerow([r.method, *(_number(v) for v in astuple(r)[1:])])
    return buf.getvalue()


def read_csv(text: str) -> list[Row]:
    """The rows of ``csv_text``'s output. ValueError for another header or a malformed line."""
    lines = list(csv.reader(io.StringIO(text)))
    if not lines or tuple(lines[0]) != HEADER:
        raise ValueError(f"not a method comparison CSV: the header must be {','.join(HEADER)}")
    kinds = [f.type for f in fields(Row)]
    rows = []
    for n, line in enumerate(lines[1:], 2):
        if not line:
            continue
        if len(line) != len(HEADER):
            raise ValueError(f"line {n} has {len(line)} values, not {len(HEADER)}")
        try:
            rows.append(Row(line[0], *(int(v) if k in ("int", int) else float(v)
                                       for v, k in zip(line[1:], kinds[1:]))))
        except ValueError:
            raise ValueError(f"line {n}: {line[1:]} are not all numbers") from None
    return rows
