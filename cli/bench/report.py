"""The benchmark's summary: per method and edit type, and overall, as CSV, Markdown and a PNG plot.

Each (id, method) counts once, with its latest row. Means run over the rows that have the value: a row with an
error has none, structure_distance is empty without DINO weights, and a background metric is empty (PIE-Bench's
"nan") where the mask leaves no unedited part. An infinite PSNR (background kept exactly) makes its mean inf.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ...models.metrics import PIE_COLUMNS
from .data import EDIT_TYPES
from .data import METHODS

SHORT = {"structure_distance": "structure", "psnr_unedit_part": "PSNR", "lpips_unedit_part": "LPIPS",
         "mse_unedit_part": "MSE", "ssim_unedit_part": "SSIM", "clip_similarity_target_image": "CLIP whole",
         "clip_similarity_target_image_edit_part": "CLIP edited"}
HEADER = ("method", "edit_type", "items", "errors", *PIE_COLUMNS, "seconds")
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (id, method), in first-seen order."""
    last: dict[tuple, dict] = {}
    for r in rows:
        last[(r["id"], r["method"])] = r
    return list(last.values())


def type_label(edit_type: str) -> str:
    return f"{edit_type} {EDIT_TYPES[edit_type]}" if edit_type in EDIT_TYPES else (edit_type or "-")


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return math.fsum(vals) / len(vals) if vals else None


def summarise(rows: list[dict]) -> list[dict]:
    """Summary lines: for each method, one per edit type (sorted) and one "all"."""
    rows = latest(rows)
    out = []
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)] + \
            sorted({r["method"] for r in rows} - set(METHODS)):
        mine = [r for r in rows if r["method"] == method]
        types = sorted({r.get("edit_type") or "" for r in mine}, key=lambda t: (not t.isdigit(), int(t) if
                                                                                t.isdigit() else 0, t))
        for t in [*types, None]:
            group = [r for r in mine if t is None or (r.get("edit_type") or "") == t]
            ok = [r for r in group if r.get("error") is None]
            line = {"method": method, "edit_type": "all" if t is None else type_label(t), "items": len(ok),
                    "errors": len(group) - len(ok)}
            for c in PIE_COLUMNS:
                line[c] = _mean([(r.get("metrics") or {}).get(c) for r in ok])
            line["seconds"] = _mean([r.get("seconds") for r in ok])
            out.append(line)
    return out


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == math.inf else f"{v:.6g}"
    return str(v)


def csv_text(lines: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for line in lines:
        w.writerow([fmt(line[h]) for h in HEADER])
    return buf.getvalue()


def markdown(lines: list[dict], notes: list[str] = ()) -> str:
    cols = ["method", "edit type", "items", "errors", *(SHORT[c] for c in PIE_COLUMNS), "s/item"]
    text = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for line in lines:
        vals = [METHODS.get(line["method"], line["method"]), line["edit_type"], line["items"], line["errors"],
                *(line[c] for c in PIE_COLUMNS), line["seconds"]]
        cells = [f"**{fmt(v)}**" if line["edit_type"] == "all" and i > 1 and v is not None else fmt(v)
                 for i, v in enumerate(vals)]
        text.append("| " + " | ".join(cells) + " |")
    legend = ("structure: DINO self-similarity distance (lower is better); PSNR / LPIPS / MSE / SSIM: the unedited "
              "part against the source; CLIP whole / edited: CLIP similarity of the result / of its edited region "
              "to the target prompt (higher is better); s/item: seconds of the edit alone.")
    return "\n".join([*text, "", legend, *notes]) + "\n"


def plot(lines: list[dict], size=(980, 0)):
    """One panel per metric: a bar per method for each edit type and overall (PIL RGB image)."""
    from PIL import Image, ImageDraw, ImageFont
    methods = list(dict.fromkeys(line["method"] for line in lines))
    types = list(dict.fromkeys(line["edit_type"] for line in lines))
    metrics = [c for c in PIE_COLUMNS if any(line[c] is not None for line in lines)]
    font = ImageFont.load_default()
    bar, gap, label_w, panel_w, head = 9, 6, 190, 380, 34
    per_type = bar * len(methods) + gap
    panel_h = head + per_type * len(types) + 10
    cols = 2
    rows = max(1, math.ceil(len(metrics) / cols))
    W = max(size[0], label_w + cols * panel_w + 20)
    H = 40 + rows * panel_h + 20
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 8), "Benchmark summary (bars: mean per edit type; inf = background kept exactly)", fill=(0, 0, 0),
           font=font)
    for n, m in enumerate(methods):
        x = 10 + 230 * n
        d.rectangle([x, 24, x + 10, 32], fill=COLORS[n % len(COLORS)])
        d.text((x + 14, 22), METHODS.get(m, m), fill=(0, 0, 0), font=font)
    for k, metric in enumerate(metrics):
        px = (label_w if k % cols == 0 else label_w + panel_w) + 10
        py = 40 + (k // cols) * panel_h
        vals = [line[metric] for line in lines if line[metric] is not None]
        finite = [v for v in vals if math.isfinite(v)]
        top = max([abs(v) for v in finite] + [1e-12])
        d.text((px, py + 6), SHORT[metric], fill=(0, 0, 0), font=font)
        width = panel_w - 90
        for t_i, t in enumerate(types):
            ty = py + head + t_i * per_type
            if k % cols == 0:
                d.text((10, ty + max(0, per_type - gap - 10) // 2), t[:30], fill=(0, 0, 0), font=font)
            for m_i, m in enumerate(methods):
                line = next((x for x in lines if x["method"] == m and x["edit_type"] == t), None)
                v = None if line is None else line[metric]
                y = ty + m_i * bar
                if v is None:
                    continue
                length = width if not math.isfinite(v) else int(width * abs(v) / top)
                d.rectangle([px, y, px + max(1, length), y + bar - 2], fill=COLORS[m_i % len(COLORS)])
                d.text((px + length + 4, y - 2), fmt(v)[:8], fill=(60, 60, 60), font=font)
        d.line([px, py + head - 2, px, py + head + per_type * len(types)], fill=(0, 0, 0))
    return im


def write(folder: Path, rows: list[dict], notes: list[str] = ()) -> list[dict]:
    """summary.csv, summary.md and summary.png in ``folder``; returns the summary lines."""
    lines = summarise(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.csv").write_text(csv_text(lines))
    (folder / "summary.md").write_text(markdown(lines, notes))
    if lines:
        plot(lines).save(folder / "summary.png")
    return lines
