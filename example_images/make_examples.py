"""Regenerate the example images (procedural, CC0): python example_images/make_examples.py

bd_scene.png            512x384 RGB scene: sky, sun, hills, a house and a red ball on the grass.
bd_scene_mask.png       the same with alpha 0 around the ball: core LoadImage gives MASK = 1 there
                        (the region to edit).
bd_scene_scribble.png   a crude green/brown tree scribbled on the grass, alpha 0 around it (scribble-guided edit).
bd_scene_sky.png        the scene with alpha 0 over an empty patch of sky (a third mask for editing sessions).
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 512, 384
HERE = Path(__file__).resolve().parent
BALL = (330, 255, 40)  # centre x, centre y, radius


def scene() -> Image.Image:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    sky = np.stack([120 + 80 * y / H, 170 + 60 * y / H, 235 + 0 * y], -1)
    hill = 230 + 25 * np.sin(x / 70) + 12 * np.sin(x / 23 + 1)
    grass = np.stack([60 + 40 * (y - 200) / H, 140 + 50 * (y - 200) / H, 50 + 0 * y], -1)
    img = np.where((y > hill)[..., None], grass, sky)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((410, 40, 470, 100), fill=(255, 220, 90))                              # sun
    d.rectangle((70, 170, 190, 260), fill=(200, 170, 130), outline=(90, 60, 40), width=3)  # house
    d.polygon([(60, 172), (130, 115), (200, 172)], fill=(150, 50, 40))               # roof
    d.rectangle((115, 210, 145, 260), fill=(100, 70, 40))                            # door
    cx, cy, r = BALL
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(210, 40, 40))                  # ball
    d.ellipse((cx - r // 2, cy - r // 2, cx - r // 8, cy - r // 8), fill=(245, 130, 130))
    return im.filter(ImageFilter.SMOOTH)


def with_alpha(im: Image.Image, hole) -> Image.Image:
    alpha = Image.new("L", im.size, 255)
    ImageDraw.Draw(alpha).ellipse(hole, fill=0)
    out = im.convert("RGBA")
    out.putalpha(alpha)
    return out


def main():
    im = scene()
    im.save(HERE / "bd_scene.png", optimize=True)
    cx, cy, r = BALL
    with_alpha(im, (cx - r - 12, cy - r - 12, cx + r + 12, cy + r + 12)).save(HERE / "bd_scene_mask.png", optimize=True)
    s = im.copy()
    d = ImageDraw.Draw(s)
    d.line([(250, 330), (252, 280), (250, 250)], fill=(110, 70, 30), width=9)           # trunk
    d.ellipse((215, 190, 290, 262), fill=(40, 130, 35), outline=(25, 95, 25), width=6)  # crown
    d.line([(225, 230), (280, 215), (230, 205)], fill=(30, 120, 30), width=8)
    with_alpha(s, (195, 170, 310, 345)).save(HERE / "bd_scene_scribble.png", optimize=True)
    with_alpha(im, (215, 25, 375, 145)).save(HERE / "bd_scene_sky.png", optimize=True)


if __name__ == "__main__":
    main()
