"""Presentation shared by the command line and the nodes: tensors as PIL images, and the fidelity/editability
plot of models/fidelity.py's rows. PIL only, imported when used; nothing here computes a result."""
from __future__ import annotations

import math

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
PLOT_SIZE = (720, 520)


def to_pil(t):
    """[3, H, W] in 0..1 → PIL RGB."""
    from PIL import Image
    arr = (t.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    return Image.fromarray(arr)


def label(parameter: str, value: float) -> str:
    """A point's label on the plot: t0=0.4, skip=20."""
    return f"{'skip' if parameter == 'skip_timesteps' else parameter}={value:g}"


def figure(rows, prompt: str, size=PLOT_SIZE):
    """The plot of a sweep's rows (models/fidelity.py's ``Row``s) as a PIL RGB image, one line per method."""
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


TABLE_COLUMNS = (("method", "method", "{}"), ("lpips", "LPIPS", "{:.4g}"), ("psnr_db", "PSNR dB", "{:.2f}"),
                 ("psnr_vae_db", "PSNR vs VAE", "{:.2f}"), ("latent_mse", "latent MSE", "{:.3g}"),
                 ("seconds", "seconds", "{:.2f}"), ("eps_calls", "eps calls", "{:d}"),
                 ("eps_evaluations", "latents", "{:d}"))
TABLE_ROW = 22  # px per row without thumbnails
TABLE_TOP = 30  # the title's band
TABLE_WIDTH = 720


def table_row_height(thumbnails: bool) -> int:
    return 72 if thumbnails else TABLE_ROW


def table(rows, title: str, images=None, width: int = TABLE_WIDTH):
    """A method comparison (models/compare.py's ``Row``s) as a PIL RGB table: a header line, then one line per
    row (alternately shaded), the best value of each score column in bold green (lowest LPIPS, latent MSE,
    seconds and eps calls; highest PSNR; the "vae" row, the ceiling, is not ranked). With ``images`` (one
    [1, 3, H, W] per row) each line starts with a thumbnail of its image. Height: TABLE_TOP + TABLE_ROW (the
    header) + len(rows) × ``table_row_height`` + 8."""
    from PIL import Image, ImageDraw, ImageFont
    thumbs = images is not None and len(images) == len(rows)
    rh = table_row_height(thumbs)
    tw = rh - 6 if thumbs else 0
    H = TABLE_TOP + TABLE_ROW + len(rows) * rh + 8
    im = Image.new("RGB", (width, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    d.text((8, 8), title[:110], fill=(0, 0, 0), font=font)
    lower = {"lpips", "latent_mse", "seconds", "eps_calls", "eps_evaluations"}
    ranked = [r for r in rows if r.method != "vae"]
    best = {}
    for key, _, _ in TABLE_COLUMNS[1:]:
        vals = [getattr(r, key) for r in ranked if not math.isnan(getattr(r, key))]
        if len(vals) > 1:
            best[key] = min(vals) if key in lower else max(vals)
    x0 = 8 + (tw + 8 if thumbs else 0)
    widths = [150] + [(width - x0 - 150 - 8) // (len(TABLE_COLUMNS) - 1)] * (len(TABLE_COLUMNS) - 1)
    xs = [x0 + sum(widths[:i]) for i in range(len(widths))]
    y = TABLE_TOP
    d.rectangle([0, y, width, y + TABLE_ROW - 1], fill=(220, 228, 240))
    for x, (_, head, _) in zip(xs, TABLE_COLUMNS):
        d.text((x, y + TABLE_ROW // 2 - 6), head, fill=(0, 0, 0), font=font)
    for n, r in enumerate(rows):
        y = TABLE_TOP + TABLE_ROW + n * rh
        d.rectangle([0, y, width, y + rh - 1], fill=(246, 246, 246) if n % 2 else (255, 255, 255))
        if thumbs:
            img = to_pil(images[n][0])
            img.thumbnail((tw, tw))
            im.paste(img, (8, y + (rh - img.height) // 2))
        for x, (key, _, fmt) in zip(xs, TABLE_COLUMNS):
            v = getattr(r, key)
            text = "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)
            win = r.method != "vae" and key in best and v == best[key]
            color = (0, 130, 0) if win else (0, 0, 0)
            d.text((x, y + rh // 2 - 6), text, fill=color, font=font)
            if win:  # bold: drawn twice, a pixel apart
                d.text((x + 1, y + rh // 2 - 6), text, fill=color, font=font)
    d.line([0, TABLE_TOP + TABLE_ROW - 1, width, TABLE_TOP + TABLE_ROW - 1], fill=(120, 120, 120))
    return im
