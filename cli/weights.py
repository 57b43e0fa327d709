"""``weights``: where the default weight files are looked up, what was found; --download fetches the missing."""
from __future__ import annotations

from .common import add_parser as new_parser, summary


def add_parser(sub):
    w = new_parser(sub, "weights", help="show where the default weight files are looked up; download them",
                   description="Lists the default weight files, the folders searched and what was "
                               "found. With --download, fetches missing ones (checked by sha256).")
    w.add_argument("--download", action="store_true", help="download the missing default files")
    w.add_argument("--include_512", action="store_true", help="also the 512x512 class-conditional model")
    w.add_argument("--lpips", action="store_true", help="instead: fetch LPIPS's VGG16 backbone into the torch hub cache")
    return w


def cmd_weights(args) -> int:
    from ..models import weights as W
    if args.lpips:  # the LPIPS backbone torchvision would download (models/weights.py ensure_lpips)
        summary.info("%-28s %s", W.LPIPS_VGG.name, W.ensure_lpips("vgg"))
        return 0
    keys = ["ddpm_256", "clip"] + (["ddpm_512"] if args.include_512 else [])
    missing = 0
    for key in keys:
        wf = W.DEFAULT_WEIGHTS[key]
        found = W.find(wf)
        dirs = W.search_dirs(wf.folder)
        if found is None and args.download:
            found = W.ensure(wf)
        if found is None:
            missing += 1
        summary.info("%-28s %s", wf.name, found if found else f"MISSING: download {wf.url} into {dirs[0]}")
        summary.info("%-28s looked in: %s", "", ", ".join(str(d) for d in dirs))
    return 1 if missing else 0
