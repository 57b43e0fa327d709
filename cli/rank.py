"""``rank``: image files scored by D_CLIP to a prompt under a mask, copied best first."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import CLIError
from .common import (add_model_args, add_parser as new_parser, check_output_dir, load_models, parameters,
                     score_token, summary, write_json)
from .images import collect_images, load_image, load_mask


def add_parser(sub):
    r = new_parser(sub, "rank", help="rank images by CLIP distance to a prompt under a mask",
                   description="Rank results (files or folders of images) by D_CLIP to the prompt "
                               "inside the mask, lower is better; copies them best first.")
    r.add_argument("images", nargs="+", help="image files and/or folders of images")
    r.add_argument("-p", "--prompt", type=str, required=True, help="the prompt the images should match")
    r.add_argument("--mask", type=str, default=None, help="mask image (default: the whole image)")
    r.add_argument("--invert_mask", action="store_true", help="score outside the mask instead")
    r.add_argument("--top_k", type=int, default=0, help="copy only the best K (0 = all); the JSON lists all")
    r.add_argument("--output_path", type=str, default="output",
                   help="copies go to <output_path>/ranked, the JSON to <output_path>/rank.json")
    add_model_args(r, ddpm=False)
    return r


def check_inputs(args) -> list[Path]:
    """The image files; every one readable (and the mask selecting a pixel of each) before CLIP is loaded."""
    if not args.prompt.strip():
        raise CLIError("-p/--prompt is empty: ranking needs the text the images should match")
    files = collect_images(args.images)
    check_output_dir(args.output_path)
    for f in files:
        img = load_image(f)
        if args.mask and not (load_mask(args.mask, tuple(img.shape[-2:]), args.invert_mask) > 0).any():
            raise CLIError(f"the mask {args.mask} selects no pixel of {f.name}")
    return files


def scores_of(files: list[Path], clip, args) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    from ..models.apps import clip_scores
    scores = []
    for f in tqdm(files, desc="scoring", unit="image", file=sys.stderr, dynamic_ncols=True):
        img = load_image(f)
        mask = load_mask(args.mask, tuple(img.shape[-2:]), args.invert_mask) if args.mask else None
        with torch.no_grad():
            scores.append(float(clip_scores(clip, img, mask, args.prompt)[0]))
    return scores


def copy_ranked(files: list[Path], scores: list[float], ranked_dir: Path, top_k: int) -> list[dict]:
    """The files copied best first (the best ``top_k``, 0 = all) as <score>_<name>; the JSON entries of all."""
    ranked_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for rank_, j in enumerate(sorted(range(len(files)), key=lambda j: (scores[j], j)), 1):
        copied = None
        if not top_k or rank_ <= top_k:
            copied = ranked_dir / f"{score_token(scores[j])}_{files[j].name}"
            shutil.copy2(files[j], copied)
        entries.append({"rank": rank_, "score": scores[j], "source": str(files[j].resolve()),
                        "file": None if copied is None else f"ranked/{copied.name}"})
    return entries


def cmd_rank(args) -> int:
    files = check_inputs(args)
    models = load_models(args, need_ddpm=False, need_clip=True)
    scores = scores_of(files, models.clip, args)
    out_dir = Path(args.output_path)
    entries = copy_ranked(files, scores, out_dir / "ranked", args.top_k)
    json_path = out_dir / "rank.json"
    write_json(json_path, {"command": "rank", "argv": args.argv, "parameters": parameters(args),
                           "resolved": {"clip": str(models.clip_file), "device": str(models.device),
                                        "precision": models.precision,
                                        "score": "D_CLIP inside the mask (lower is better)"},
                           "results": entries})
    best = min(range(len(files)), key=lambda j: (scores[j], j))
    summary.info("ranked %d image(s) in %s (JSON %s); best: %s (D_CLIP %.4f)", len(files), out_dir / "ranked",
                 json_path, files[best], scores[best])
    return 0
