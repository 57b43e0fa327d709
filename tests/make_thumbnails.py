"""Draw the template browser's thumbnails: workflows/<name>.jpg for every workflows/<name>.json.

ComfyUI's frontend asks for /api/workflow_templates/<pack>/<name>.jpg next to each template. Each
thumbnail is a map of the graph as the canvas shows it (groups, nodes with their titles and colours,
links coloured by type) under the workflow's name. Run after changing a workflow:

    python tests/make_thumbnails.py            # write
    python tests/make_thumbnails.py --check    # compare with the files on disk (tests/test_workflows.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageStat

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "workflows"
SIZE = (640, 400)
HEADER = 44
BG, GRID, NODE, NODE_TITLE, TEXT = (32, 32, 32), (40, 40, 40), (53, 53, 53), (34, 34, 34), (220, 220, 220)
LINK_COLORS = {  # ComfyUI's default link colours by type; the pack's own types in their node colours
    "IMAGE": "#64B5F6", "MASK": "#81C784", "LATENT": "#FF9CF9", "MODEL": "#B39DDB", "CLIP": "#FFD500",
    "VAE": "#FF6E6E", "CONDITIONING": "#FFA931", "STRING": "#77FF77", "INT": "#29699C", "FLOAT": "#AAEE88",
}
OTHER_LINK = "#9E9E9E"
TITLE_H = 30  # LiteGraph's title bar height in graph units


def _rgb(color: str | None, default):
    """'#abc' / '#aabbcc' → (r, g, b)."""
    if not color or not color.startswith("#"):
        return default
    c = color[1:]
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    try:
        return tuple(int(c[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return default


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def title_of(name: str) -> str:
    words = name.split("_")
    if words[0].isdigit():
        words = words[1:]
    elif words[0] == "nulltext" and len(words) > 1 and words[1].isdigit():
        words = ["NULL-text:"] + words[2:]
    text = " ".join("SDXL" if w == "sdxl" else w for w in words)
    return text[:1].upper() + text[1:]


def thumbnail(wf: dict, name: str) -> Image.Image:
    nodes = [n for n in wf["nodes"] if n.get("mode", 0) != 4]
    groups = wf.get("groups", [])
    boxes = [(*n["pos"][:2], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in groups]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes) - TITLE_H
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    W, H = SIZE
    pad = 14
    scale = min((W - 2 * pad) / (x1 - x0), (H - HEADER - 2 * pad) / (y1 - y0))
    ox = pad + ((W - 2 * pad) - (x1 - x0) * scale) / 2
    oy = HEADER + pad + ((H - HEADER - 2 * pad) - (y1 - y0) * scale) / 2

    def p(x, y):
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    im = Image.new("RGB", SIZE, BG)
    d = ImageDraw.Draw(im)
    for gx in range(0, W, 20):
        d.line([(gx, HEADER), (gx, H)], fill=GRID)
    for gy in range(HEADER, H, 20):
        d.line([(0, gy), (W, gy)], fill=GRID)
    small = _font(max(8, min(13, int(22 * scale))))
    for g in groups:
        gx, gy, gw, gh = g["bounding"]
        c = _rgb(g.get("color"), (80, 120, 160))
        fill = tuple(int(v * 0.3 + b * 0.7) for v, b in zip(c, BG))
        d.rounded_rectangle([p(gx, gy), p(gx + gw, gy + gh)], radius=4, fill=fill, outline=c)
        d.text((p(gx, gy)[0] + 4, p(gx, gy)[1] + 2), g.get("title", ""), fill=c, font=small)
    by_id = {n["id"]: n for n in nodes}
    for link in wf.get("links", []):
        _, src, src_slot, dst, dst_slot, kind = link[:6]
        if src not in by_id or dst not in by_id:
            continue
        a, b = by_id[src], by_id[dst]
        sx, sy = p(a["pos"][0] + a["size"][0], a["pos"][1] + 10 + 20 * src_slot)
        tx, ty = p(b["pos"][0], b["pos"][1] + 10 + 20 * dst_slot)
        bend = max(20.0, abs(tx - sx) / 2)
        pts = []
        for i in range(21):  # a cubic Bézier, as the canvas draws links
            t = i / 20
            c0, c1, c2, c3 = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
            pts.append((c0 * sx + c1 * (sx + bend) + c2 * (tx - bend) + c3 * tx, c0 * sy + c1 * sy + c2 * ty + c3 * ty))
        d.line(pts, fill=_rgb(LINK_COLORS.get(str(kind), OTHER_LINK), (158, 158, 158)), width=2)
    for n in nodes:
        x, y = n["pos"][:2]
        w, h = n["size"][:2]
        body = _rgb(n.get("bgcolor"), NODE)
        head = _rgb(n.get("color"), NODE_TITLE)
        (ax, ay), (bx, by) = p(x, y - TITLE_H), p(x + w, y + h)
        d.rounded_rectangle([ax, ay, bx, by], radius=3, fill=body, outline=(0, 0, 0))
        d.rounded_rectangle([ax, ay, bx, p(x, y)[1]], radius=3, fill=head)
        label = n.get("title") or n.get("type", "")
        while label and d.textlength(label, font=small) > bx - ax - 6:
            label = label[:-2] + "…" if len(label) > 2 else ""
        d.text((ax + 3, ay + 1), label, fill=TEXT, font=small)
    d.rectangle([0, 0, W, HEADER], fill=(24, 24, 24))
    d.text((14, 10), title_of(name), fill=(255, 255, 255), font=_font(20))
    return im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for path in sorted(UI_DIR.glob("*.json")):
        im = thumbnail(json.loads(path.read_text()), path.stem)
        jpg = path.with_suffix(".jpg")
        if args.check:
            # fonts differ a little between Pillow versions: compare pixels, not bytes
            if not jpg.is_file() or Image.open(jpg).size != im.size or max(ImageStat.Stat(
                    ImageChops.difference(Image.open(jpg).convert("RGB"), im)).mean) > 4:
                stale.append(jpg)
        else:
            im.save(jpg, quality=88, optimize=True)
    if stale:
        print("out of date (run tests/make_thumbnails.py):", *map(str, stale), sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
