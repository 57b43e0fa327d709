"""Command line: ``python -m blended_diffusion {edit,extrapolate,rank,fidelity,run,weights,bench} ...``
(also installed as the ``blended-diffusion`` console script).

``edit`` takes the official code's flags with their defaults (omriav/blended-diffusion main.py), so an
old command line can be pasted after ``edit`` (or with no subcommand at all). Only ``fidelity --sd-checkpoint``
and ``bench --sd-checkpoint`` import ComfyUI (host/sd.py loads Stable Diffusion checkpoints through ``comfy.sd``);
everything else runs without it. ``bench`` lives in bench/ (command.py registers it here).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .render import figure, label, to_pil

log = logging.getLogger("blended_diffusion.cli")
summary = logging.getLogger("blended_diffusion.cli.summary")  # final lines, to stdout

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SUBCOMMANDS = ("edit", "extrapolate", "rank", "fidelity", "run", "weights", "bench")

# The bundled example that `edit` / `extrapolate` use without -i: (image, mask, prompt), first found.
EXAMPLE_CANDIDATES = (
    ("bd_scene.png", "bd_scene_mask.png", "a watermelon"),
)


class CLIError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


# --- argument parsing ---------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`-h` shows every option's default: "(default: X)" after its help, unless the help already names its
    default ("default: X" / "default X") or there is none to show (no value, an on/off flag, a repeatable option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default == []
                or re.search(rf"default:?\s+{re.escape(str(default))}", text)):
            return text
        return text + " (default: %(default)s)"


SIDE_WORDS = {"left": "beyond its left edge", "right": "beyond its right edge", "up": "above its top edge",
              "down": "below its bottom edge"}


def _add_model_args(p: argparse.ArgumentParser, *, ddpm: bool = True, clip: bool = True):
    g = p.add_argument_group("models and device")
    if ddpm:
        g.add_argument("--model", metavar="PATH", default=None,
                       help="guided-diffusion checkpoint (.pt/.safetensors); default: "
                            "256x256_diffusion_uncond.pt (512x512_diffusion.pt with --model_output_size "
                            "512) from the model folders, downloaded if missing")
    if clip:
        g.add_argument("--clip", metavar="PATH", default=None,
                       help="OpenAI CLIP checkpoint; default: ViT-B-16.pt from the model folders, "
                            "downloaded if missing")
    g.add_argument("--device", default="auto",
                   help="torch device: auto (cuda:<gpu_id> if available, else mps, else cpu), cpu, cuda, "
                        "cuda:1, … (default: auto)")
    g.add_argument("--gpu_id", type=int, default=0, help="GPU index used by --device auto (official flag)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp16 on CUDA (as the official code), fp32 elsewhere")
    g.add_argument("--clip_precision", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="CLIP's precision if not --precision's (e.g. bf16 on a CPU with bf16 support: CLIP "
                        "is the part of a CPU step beyond the UNet's own cost; see README, Performance)")
    g.add_argument("--offline", action="store_true",
                   help="never download weights; fail with the file name, URL and folder instead")


def _add_diffusion_args(p: argparse.ArgumentParser):
    p.add_argument("--timestep_respacing", type=str, default="100",
                   help="respaced steps out of 1000 (guided-diffusion syntax: '100', 'ddim50', '10,20')")
    p.add_argument("--model_output_size", type=int, default=256, choices=[256, 512],
                   help="which default model to use: 256 (unconditional) or 512 (class-conditional)")
    p.add_argument("--ddim", action="store_true", help="DDIM (Algorithm 3) instead of DDPM (Algorithm 2)")
    p.add_argument("--aug_num", type=int, default=8, help="number of extending augmentations (CLIP views)")
    p.add_argument("--clip_guidance_lambda", type=float, default=1000,
                   help="weight of the CLIP loss (how much the region should match the prompt)")
    p.add_argument("--range_lambda", type=float, default=50,
                   help="weight of the range loss (penalises x̂0 values outside [-1, 1])")
    p.add_argument("--seed", type=int, default=404, help="random seed")


def _add_context_arg(p: argparse.ArgumentParser):
    p.add_argument("--context", type=float, default=0.25,
                   help="margin around the mask's bounding box, as a fraction of the box on each side: the square "
                        "the model works on, resized to the model size, so a small mask gets the model's "
                        "resolution (enlarged at most 4x) (default 0.25)")


def check_context(context: float) -> None:
    if not 0 <= context < float("inf"):
        raise CLIError(f"--context = {context}: it must be a finite number >= 0 (the margin around the mask as a "
                       "fraction of its box; 0.25 by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blended-diffusion", formatter_class=HelpFormatter,
        description="Blended Diffusion: text-driven editing of a region of a real image "
                    "(Avrahami et al., CVPR 2022), from the command line.",
        epilog="Run `%(prog)s SUBCOMMAND -h` for the options of each subcommand. An official "
               "command line (main.py -p ... -i ... --mask ...) works pasted after `edit`, or alone.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the summary")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    # edit -------------------------------------------------------------------------------------
    e = sub.add_parser("edit", formatter_class=HelpFormatter, help="edit the masked region of an image to match a prompt",
                       description="Blended Diffusion edit with the official flags and defaults. "
                                   "Without -i/--mask, edits the example that ships with the pack.")
    e.add_argument("-p", "--prompt", type=str, default=None,
                   help="the text the edited region should match ('' = no guidance: removal/inpainting)")
    e.add_argument("-i", "--init_image", type=str, default=None, help="the source image")
    e.add_argument("--mask", type=str, default=None,
                   help="mask image: any non-zero pixel is edited; with transparency, transparent pixels "
                        "are edited (ComfyUI's convention). Without it: -i's own transparent pixels if "
                        "any, else the whole image")
    e.add_argument("--skip_timesteps", type=int, default=25,
                   help="steps skipped at the start (more = closer to the source, fewer = freer)")
    _add_context_arg(e)
    _add_diffusion_args(e)
    e.add_argument("--local_clip_guided_diffusion", action="store_true",
                   help="Algorithm 1 (local CLIP-guided diffusion, no blending) for comparison")
    e.add_argument("--lpips_sim_lambda", type=float, default=1000,
                   help="LPIPS background weight (with --background_preservation_loss)")
    e.add_argument("--l2_sim_lambda", type=float, default=10000,
                   help="L2 background weight (with --background_preservation_loss)")
    e.add_argument("--background_preservation_loss", action="store_true",
                   help="add the LPIPS + L2 background loss (Algorithm 1's D_bg)")
    e.add_argument("--invert_mask", action="store_true", help="edit outside the mask instead")
    e.add_argument("--no_enforce_background", action="store_false", dest="enforce_background",
                   help="do not paste the exact source background after the last step")
    e.add_argument("--batch_size", type=int, default=4, help="results per diffusion run")
    e.add_argument("--iterations_num", type=int, default=8, help="diffusion runs (results = iterations × batch)")
    e.add_argument("--output_path", type=str, default="output", help="output folder")
    e.add_argument("-o", "--output_file", type=str, default="output.png",
                   help="result file name; results are <stem>_i_<iteration>_b_<index>.png")
    e.add_argument("--vid", action="store_true", dest="save_video",
                   help="also save the x̂0 of every step of each result as an animated GIF")
    e.add_argument("--export_assets", action="store_true",
                   help="also save the source image, the binary mask and the results to <output_path>/assets")
    e.add_argument("--fast", action="store_true",
                   help="no backward pass through the UNet (∂x̂0/∂x_t taken as its linear part): faster, "
                        "slightly different results")
    _add_model_args(e)

    # extrapolate ------------------------------------------------------------------------------
    x = sub.add_parser("extrapolate", formatter_class=HelpFormatter, help="extend an image beyond its borders, guided by a prompt per side",
                       description="Text-guided extrapolation (paper supplement B.5.2). Name each side "
                                   "to extend with its prompt, e.g. --left 'a lake' --right 'a forest'. "
                                   "The result is at the model's resolution (its height is the model size "
                                   "when extending left/right, its width when extending up/down).")
    x.add_argument("-i", "--init_image", type=str, default=None,
                   help="the image to extend (default: the bundled example)")
    for d in ("left", "right", "up", "down"):
        x.add_argument(f"--{d}", metavar="PROMPT", nargs="?", const=True, default=None,
                       help=f"extend the image {SIDE_WORDS[d]} under this prompt (no text: use -p; '' = unguided)")
    x.add_argument("-p", "--prompt", type=str, default=None, help="prompt for the sides given without text")
    x.add_argument("--amount", type=float, default=0.5,
                   help="growth per side as a fraction of the image size (0.5 adds half the width)")
    x.add_argument("--k_min", type=int, default=None, help="fewest denoising steps of a stage (default 0.5·steps)")
    x.add_argument("--k_max", type=int, default=None, help="most denoising steps of a stage (default 0.8·steps)")
    x.add_argument("--final_k", type=int, default=None,
                   help="steps of the final unguided harmonising pass (default 0.2·steps, 0 = none)")
    _add_diffusion_args(x)
    x.add_argument("--output_path", type=str, default="output", help="output folder")
    x.add_argument("-o", "--output_file", type=str, default="extrapolated.png", help="result file name")
    _add_model_args(x)

    # rank -------------------------------------------------------------------------------------
    r = sub.add_parser("rank", formatter_class=HelpFormatter, help="rank images by CLIP distance to a prompt under a mask",
                       description="Rank results (files or folders of images) by D_CLIP to the prompt "
                                   "inside the mask, lower is better; copies them best first.")
    r.add_argument("images", nargs="+", help="image files and/or folders of images")
    r.add_argument("-p", "--prompt", type=str, required=True, help="the prompt the images should match")
    r.add_argument("--mask", type=str, default=None, help="mask image (default: the whole image)")
    r.add_argument("--invert_mask", action="store_true", help="score outside the mask instead")
    r.add_argument("--top_k", type=int, default=0, help="copy only the best K (0 = all); the JSON lists all")
    r.add_argument("--output_path", type=str, default="output",
                   help="copies go to <output_path>/ranked, the JSON to <output_path>/rank.json")
    _add_model_args(r, ddpm=False)

    # fidelity ---------------------------------------------------------------------------------
    f = sub.add_parser("fidelity", formatter_class=HelpFormatter, help="fidelity/editability curve: LPIPS to the source vs CLIP distance to the "
                                        "prompt over a sweep (plot + CSV)",
                       description="The supplement's fidelity/editability measurement: each result's LPIPS to the "
                                   "source (whole image) against its CLIP distance to the prompt (inside the mask; "
                                   "the whole image without one). With --mask: Blended Diffusion over "
                                   "--skip-timesteps. With --sd-checkpoint: SDEdit over --t0 after NULL-text "
                                   "inversion and plain (needs ComfyUI to load the checkpoint). Both give one plot. "
                                   "Writes <output_path>/fidelity.png, fidelity.csv (method, parameter, value, "
                                   "lpips, clip_distance) and fidelity.json. Without -i/--mask/--sd-checkpoint, "
                                   "sweeps the bundled example.")
    f.add_argument("-p", "--prompt", type=str, default=None,
                   help="the target prompt: the edits go towards it and every result is scored against it")
    f.add_argument("-i", "--init_image", type=str, default=None, help="the source image")
    f.add_argument("--mask", type=str, default=None,
                   help="mask image (read as for edit): the region Blended Diffusion edits and the CLIP distance "
                        "is measured in")
    f.add_argument("--invert_mask", action="store_true", help="use the outside of the mask instead")
    _add_context_arg(f)
    f.add_argument("--skip-timesteps", "--skip_timesteps", dest="skip_timesteps", default="20,40,60,80",
                   metavar="N,N,...", help="Blended Diffusion sweep: skipped steps of the respaced schedule "
                                           "(more = closer to the source; default 20,40,60,80)")
    _add_diffusion_args(f)
    g = f.add_argument_group("SDEdit with and without NULL-text inversion (Stable Diffusion 1.x/2.x via ComfyUI)")
    g.add_argument("--sd-checkpoint", dest="sd_checkpoint", metavar="FILE", default=None,
                   help="an SD1.x/SD2.x checkpoint (.safetensors/.ckpt with its VAE and text encoder), loaded "
                        "with ComfyUI's comfy.sd")
    g.add_argument("--comfyui", metavar="DIR", default=None,
                   help="the ComfyUI installation to load it with; this Python must have its requirements "
                        "(default: $COMFYUI_PATH)")
    g.add_argument("--source-prompt", dest="source_prompt", metavar="CAPTION", default=None,
                   help="a caption of the source image: NULL-text inversion starts from it")
    g.add_argument("--inversion", metavar="FILE", default=None,
                   help="a saved inversion (ComfyUI's Save Inversion, or --save-inversion) instead of inverting "
                        "-i; its source image is the sweep's source")
    g.add_argument("--save-inversion", dest="save_inversion", metavar="FILE", default=None,
                   help="also keep the inversion made here (.safetensors, loadable with --inversion or Load "
                        "Inversion)")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps of the inversion (default 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default 7.5, or the inversion's with --inversion)")
    g.add_argument("--inner-steps", dest="inner_steps", type=int, default=10,
                   help="NULL-text optimisation: Adam steps per DDIM step (default 10; 0 = plain DDIM inversion)")
    g.add_argument("--t0", default="0.2,0.4,0.6,0.8,1.0", metavar="T,T,...",
                   help="SDEdit strengths to sweep, fractions of the DDIM steps in (0, 1] (default "
                        "0.2,0.4,0.6,0.8,1.0)")
    g.add_argument("--no-plain-sdedit", dest="plain_sdedit", action="store_false",
                   help="only SDEdit after NULL-text inversion (no plain SDEdit from random noise)")
    f.add_argument("--save-images", "--save_images", dest="save_images", action="store_true",
                   help="also save every result to <output_path>/fidelity_images/")
    f.add_argument("--output_path", type=str, default="output", help="output folder")
    _add_model_args(f)

    # run --------------------------------------------------------------------------------------
    u = sub.add_parser("run", formatter_class=HelpFormatter, help="execute a workflows/api/*.json graph without ComfyUI",
                       description="Run an API-format workflow with the pack's standalone graph runner. "
                                   "Override inputs with --set NODE_ID.INPUT=VALUE (repeatable).")
    u.add_argument("workflow", help="path to an API-format workflow JSON, or the name of one in workflows/api")
    u.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE", dest="overrides",
                   help="override an input, e.g. --set 3.seed=5 or --set 6.text='a red ball' "
                        "(values are parsed as JSON when they can be)")
    u.add_argument("--output_path", type=str, default="output", help="folder for the saved images")
    u.add_argument("--input_dir", type=str, default=None,
                   help="folder LoadImage reads from (default: the pack's example_images/; absolute paths in "
                        "--set N.image=/path/x.png work too)")
    u.add_argument("--models_dir", type=str, default=None,
                   help="folder with ddpm/ and clip_guidance/ subfolders holding the workflow's model files "
                        "(default: $BLENDED_DIFFUSION_MODELS, ComfyUI's models folder, ~/.cache/blended_diffusion)")
    u.add_argument("--list", action="store_true", help="list the bundled API workflows and exit")

    # weights ----------------------------------------------------------------------------------
    w = sub.add_parser("weights", formatter_class=HelpFormatter, help="show where the default weight files are looked up; download them",
                       description="Lists the default weight files, the folders searched and what was "
                                   "found. With --download, fetches missing ones (checked by sha256).")
    w.add_argument("--download", action="store_true", help="download the missing default files")
    w.add_argument("--include_512", action="store_true", help="also the 512x512 class-conditional model")
    w.add_argument("--lpips", action="store_true", help="instead: fetch LPIPS's VGG16 backbone into the torch hub cache")

    from .bench.command import add_parser as add_bench_parser  # bench/: dataset-scale runs, local or on Ray
    add_bench_parser(sub)
    return parser


def _implicit_edit(argv: list[str]) -> list[str]:
    """An official command line without subcommand (``-p ... -i ...``) means ``edit``."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "--verbose", "-q", "--quiet"):
        return ["edit", *argv]
    return argv


# --- helpers ------------------------------------------------------------------------------------
def resolve_device(name: str, gpu_id: int = 0):
    import torch
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    return dev


def resolve_precision(precision: str, device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def count_steps(respacing: str) -> int:
    """Number of respaced steps, checked before any model is loaded."""
    from guided_diffusion.respace import space_timesteps
    try:
        n = len(space_timesteps(1000, respacing))
    except (ValueError, TypeError) as e:
        raise CLIError(f"--timestep_respacing {respacing!r}: {e}. Use a number of steps such as 100, "
                       "'ddim50', or comma-separated counts per section") from None
    if n == 0 or (not respacing.startswith("ddim") and any(int(c) < 0 for c in respacing.split(","))):
        raise CLIError(f"--timestep_respacing {respacing!r} keeps no denoising step: use 1 to 1000 steps, "
                       "e.g. 100 or 'ddim50'")
    return n


def check_weights(args, names: tuple[str, ...]) -> None:
    """Loss weights are >= 0 (a negative CLIP weight would push the region away from the prompt)."""
    for name in names:
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):  # NaN and inf fail too
            raise CLIError(f"--{name} = {value}: it must be a finite number >= 0 (0 turns the term off)")


def check_output_dir(path: str | Path, flag: str = "--output_path") -> Path:
    """``path`` is a folder that exists or can be created, and files can be written in it: checked before any
    model is loaded, so a path under a regular file, a read-only location or one the system refuses (/proc,
    /sys, a folder without write permission) is one error line instead of a traceback after sampling. The
    check writes a probe (a file in the folder, or a folder in its nearest existing parent) and removes it at
    once: it holds for root too, whom permission bits do not stop, and nothing is left behind."""
    import tempfile
    out = Path(path).expanduser()
    base = out
    try:
        base = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
        if base == out and not out.is_dir():
            raise CLIError(f"{flag} {path} is a file, not a folder: give a folder")
        if not base.is_dir():
            raise CLIError(f"{flag} {path}: {base} is a file, not a folder, so nothing can be created under it; "
                           "give a folder")
        if base == out:
            fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=out)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=base))
    except OSError as e:
        what = "write files in" if base == out else "create a folder in"
        raise CLIError(f"{flag} {path}: cannot {what} {base} (refused: {e.strerror or e}); give a folder you can write "
                       "to") from None
    return out


WEIGHTS_HINT = ("`blended-diffusion weights` lists the files and the folders searched, `blended-diffusion weights "
                "--download` fetches them; or give the files' paths with --model / --clip")


def resolve_weights(args, *, need_ddpm: bool, need_clip: bool) -> tuple[Path | None, Path | None]:
    """(DDPM file or None, CLIP file or None). Every file the command needs is checked before anything is
    downloaded or loaded, and all that are missing are named in one error (a --model/--clip path that does not
    exist, default files with --offline or after a failed download: each with its URL and folder). Missing
    default files are downloaded otherwise."""
    from .models import weights as W
    wanted = []
    if need_ddpm:
        key = "ddpm_512" if getattr(args, "model_output_size", 256) == 512 else "ddpm_256"
        wanted.append(("ddpm", args.model, key))
    if need_clip:
        wanted.append(("clip", args.clip, "clip"))
    found: dict[str, Path] = {}
    bad_paths: list[str] = []
    missing: list = []  # (role, WeightFile)
    for role, explicit, key in wanted:
        if explicit:
            p = Path(explicit).expanduser()
            if p.is_file():
                found[role] = p
            else:
                what = ("--clip expects an OpenAI CLIP checkpoint such as ViT-B-16.pt" if role == "clip" else
                        "--model expects a guided-diffusion checkpoint such as 256x256_diffusion_uncond.pt")
                bad_paths.append(f"{explicit}: file not found ({what})")
        else:
            wf = W.DEFAULT_WEIGHTS[key]
            p = W.find(wf)
            if p is None:
                missing.append((role, wf))
            else:
                found[role] = p

    def listing(items) -> str:
        return "; ".join(f"{wf.name} ({wf.description}) from {wf.url} into {W.search_dirs(wf.folder)[0]}"
                         for _, wf in items)

    if bad_paths:
        also = f"; also missing: {listing(missing)}. {WEIGHTS_HINT}" if missing else ""
        raise CLIError("; ".join(bad_paths) + also)
    if missing and args.offline:
        raise CLIError(f"{len(missing)} weight file(s) missing and --offline forbids downloads: {listing(missing)}. "
                       f"Download them into those folders. {WEIGHTS_HINT}")
    for i, (role, wf) in enumerate(missing):
        try:
            found[role] = W.ensure(wf)
        except W.WeightsError as e:
            rest = missing[i + 1:]
            also = f" Also missing: {listing(rest)}." if rest else ""
            raise CLIError(f"{e}{also} {WEIGHTS_HINT}") from None
    return found.get("ddpm"), found.get("clip")


def find_example() -> tuple[Path, Path | None, str]:
    """The bundled example: (image, mask, prompt)."""
    from .models.weights import EXAMPLES_DIR
    for img, mask, prompt in EXAMPLE_CANDIDATES:
        if (EXAMPLES_DIR / img).is_file():
            m = EXAMPLES_DIR / mask if mask and (EXAMPLES_DIR / mask).is_file() else None
            return EXAMPLES_DIR / img, m, prompt
    raise CLIError(f"the bundled example image is missing from {EXAMPLES_DIR}; give an image with "
                   "-i IMAGE (and --mask MASK, -p PROMPT)")


def load_image(path: str | Path, with_alpha: bool = False):
    """Image file → [1, 3, H, W] float in 0..1 (models/imageio.py: any mode at its real depth, EXIF
    orientation applied, the first frame); ``with_alpha``: also its opacity [H, W], None without
    transparency."""
    from .models import imageio
    try:
        rgb, alpha = imageio.load_image(path)
    except (FileNotFoundError, imageio.ImageFileError) as e:
        raise CLIError(str(e)) from None
    return (rgb, alpha) if with_alpha else rgb


def transparent_region(alpha):
    """Pixels that are not fully opaque (numpy bool [H, W]) of an opacity map, or None if all are."""
    return None if alpha is None or not (alpha < 1).any() else (alpha < 1).numpy()


def load_mask(path: str | Path, size_hw: tuple[int, int], invert: bool = False):
    """Mask file → [1, H, W] float 0/1 at the image size (nearest resampling, as the official code).
    Which pixels are masked: models/imageio.py's mask_array."""
    import numpy as np
    import torch
    from PIL import Image

    from .models import imageio
    try:
        m = imageio.load_mask(path)
    except (FileNotFoundError, imageio.ImageFileError) as e:
        raise CLIError(str(e)) from None
    h, w = size_hw
    if m.shape != (h, w):
        mh, mw = m.shape
        if abs(mh / mw - h / w) > 0.02:
            log.warning("mask %s is %dx%d but the image is %dx%d (another aspect ratio): stretched",
                        path, mw, mh, w, h)
        else:
            log.info("mask %s resized from %dx%d to the image's %dx%d (nearest)", path, mw, mh, w, h)
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    if invert:
        m = ~m
    return torch.from_numpy(m.astype(np.float32))[None]


def checked_mask(path: str, size_hw: tuple[int, int], invert: bool):
    """A mask file at the image size that selects at least one pixel."""
    mask = load_mask(path, size_hw, invert)
    if not (mask > 0).any():
        raise CLIError(f"the mask {path} selects no pixel" + (" after --invert_mask" if invert else "")
                       + ": paint the region to edit in white (any non-zero value) on black")
    return mask


def score_token(score: float | None) -> str:
    """The official ranked file-name prefix: the distance with 4 decimals, dot removed (sorts best first)."""
    return "none" if score is None or score != score else f"{score:.4f}".replace(".", "")


def contact_sheet(tiles: list, path: Path, tile: int = 256, cols: int | None = None, title: str = "",
                  min_side: int = 32):
    """Grid of (PIL image, caption) tiles: cells ``tile`` wide and as tall as the tallest image's aspect
    ratio needs (at most 4 × ``tile``, at least ``min_side``), each image fitted in its cell with its caption
    below. Images are shrunk, never enlarged, unless their short side would be under ``min_side``: then they
    are enlarged to it, and an extreme aspect (a 10000×50 strip) has its short side stretched to ``min_side``,
    so every tile shows a visible picture."""
    from PIL import Image, ImageDraw, ImageFont
    n = len(tiles)
    cols = cols or max(1, min(n, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    aspect = min(max(im.height / im.width for im, _ in tiles), 4.0)
    tw, th = tile, max(min_side, round(tile * aspect))
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    cap, pad, head = 22, 6, (26 if title else 0)
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, head + rows * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 6), title[:200], fill="black", font=font)
    for k, (im, caption) in enumerate(tiles):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * (tw + pad), head + pad + r * (th + cap + pad)
        thumb = _fit_tile(im, tw, th, min_side)
        sheet.paste(thumb, (x0 + (tw - thumb.width) // 2, y0 + (th - thumb.height) // 2))
        draw.text((x0 + 2, y0 + th + 3), caption, fill="black", font=font)
    sheet.save(path)
    return sheet


def _fit_tile(im, tw: int, th: int, min_side: int):
    """``im`` resized into a ``tw``×``th`` cell (see contact_sheet)."""
    from PIL import Image
    w, h = im.size
    scale = min(1.0, tw / w, th / h)
    if min(w, h) * scale < min_side:  # a tiny image or a sliver: as large as the cell allows, up to min_side
        scale = min(tw / w, th / h, min_side / min(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    nw, nh = max(nw, min(min_side, tw)), max(nh, min(min_side, th))  # an extreme aspect: short side stretched
    return im.resize((nw, nh), Image.LANCZOS) if (nw, nh) != (w, h) else im.copy()


def mask_overlay(image, mask):
    """The source with the edited region tinted red (for the contact sheet)."""
    import torch
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    m = mask[0][None]
    return to_pil(image[0] * (1 - 0.5 * m) + red * 0.5 * m)


def made_dirs(path: Path) -> list[Path]:
    """Create ``path`` (and missing parents); returns the folders this created, deepest first."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, where they are still empty."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()  # only succeeds when empty


def parameters(args) -> dict:
    """Every parsed option, for the JSON record."""
    return {k: v for k, v in vars(args).items() if k != "argv"}


def write_json(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


class StepBar:
    """tqdm over all sampling steps, fed by the engine's per-step callback. ``on_first_step(seconds)`` is
    called once, after the first step, with the time since the bar was made (the sampling started)."""

    def __init__(self, total: int | None, desc: str):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.frames: list | None = None
        self.on_first_step = None
        self.started = time.perf_counter()

    def __call__(self, step: int, total: int, x0):
        if self.bar.n == 0 and self.on_first_step is not None:
            self.on_first_step(time.perf_counter() - self.started)
        self.bar.update(1)
        if self.bar.total is not None and self.bar.n > self.bar.total:
            self.bar.total = self.bar.n
        if self.frames is not None:
            self.frames.append(((x0.detach().float().cpu() + 1) / 2).clamp(0, 1))

    def close(self):
        self.bar.close()


def format_duration(seconds: float) -> str:
    """12 s, 9 min, 2 h 05 min, 3.5 days."""
    if seconds < 59.5:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{seconds / 86400:.1f} days"


def job_seconds(step_seconds: float, *, steps: int, chunks: int, iterations: int) -> float:
    """The whole job's sampling time from one measured step of one batch: step time × steps × batches per
    iteration × iterations."""
    return step_seconds * steps * chunks * iterations


def cpu_estimate(step_seconds: float, *, batch: int, chunk: int, steps: int, iterations: int, respacing: str,
                 skip: int) -> str:
    """The line logged after the first step of a CPU run: the estimate, and the flags that make it shorter,
    with what a quick run (one result, about 15 steps) would take at the measured speed."""
    chunks = math.ceil(batch / chunk)
    total = job_seconds(step_seconds, steps=steps, chunks=chunks, iterations=iterations)
    per_result = step_seconds / chunk
    quick_resp = 20
    quick_skip = min(quick_resp - 1, round(quick_resp * skip / (steps + skip)))
    quick_steps = quick_resp - quick_skip
    shape = f", batch {chunk}" if chunks == 1 else f" × {chunks} batches of {chunk}"
    return (f"first step: {step_seconds:.1f} s for a batch of {chunk} → the whole job ({iterations} iteration(s) × "
            f"{steps} steps{shape}) takes about {format_duration(total)} on this CPU. "
            f"Shorter: fewer results with --iterations_num (now {iterations}) and --batch_size (now {batch}); fewer "
            f"steps with --timestep_respacing (now {respacing}) and --skip_timesteps (now {skip}, {steps} steps run); "
            f"--fast (no UNet backward, about 2× faster a step). E.g. --iterations_num 1 --batch_size 1 "
            f"--timestep_respacing {quick_resp} --skip_timesteps {quick_skip} ({quick_steps} steps, one result) takes "
            f"about {format_duration(per_result * quick_steps)} (README: On a CPU)")


def announce_device(device, requested: str | None, precision: str) -> None:
    """Say which device runs the job, and on a CPU that it is slow."""
    if device.type == "cpu":
        why = "--device cpu" if requested not in (None, "", "auto") else "no CUDA or MPS GPU found"
        log.info("device: CPU (%s), %s. A CPU is slow: a guided step of the 256x256 model takes tens of seconds, "
                 "the default job (8 iterations × batch 4 × 75 steps) many hours; an estimate follows the first "
                 "step", why, precision)
    else:
        import torch
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
        log.info("device: %s (%s), %s", device, name, precision)


def load_models(args, *, need_ddpm: bool, need_clip: bool, respacing: str | None = None):
    """(ddpm or None, clip or None, device, precision), with a progress bar."""
    from tqdm.auto import tqdm

    from .models import load_clip, load_ddpm
    device = resolve_device(args.device, getattr(args, "gpu_id", 0))
    precision = resolve_precision(args.precision, device)
    announce_device(device, args.device, precision)
    if device.type == "cpu":
        from .models import memory
        memory.setup_cpu_process()  # keep freed memory: about 20% faster guided steps (models/memory.py)
    ddpm_file, clip_file = resolve_weights(args, need_ddpm=need_ddpm, need_clip=need_clip)
    ddpm = clip = None
    from .models.memory import out_of_memory
    loading = None
    try:
        with tqdm(total=int(need_ddpm) + int(need_clip), desc="loading models", unit="model", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            if need_ddpm:
                loading = ddpm_file
                bar.set_postfix_str(ddpm_file.name)
                ddpm = load_ddpm(str(ddpm_file), respacing=respacing, precision=precision, device=device)
                bar.update()
            if need_clip:
                loading = clip_file
                bar.set_postfix_str(clip_file.name)
                clip = load_clip(str(clip_file), device=device,
                                 precision=resolve_precision(getattr(args, "clip_precision", None) or args.precision,
                                                             device))
                bar.update()
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"out of memory while loading {loading} ({first}): the {device.type.upper()} has too little "
                       "free memory for the model; close other programs, or use a smaller model (or --precision "
                       "fp16/bf16 on a GPU)") from None
    if need_ddpm and getattr(args, "model", None) and ddpm.image_size != args.model_output_size \
            and args.model_output_size != 256:
        log.warning("--model_output_size %d ignored: %s is a %dx%d model", args.model_output_size,
                    ddpm_file, ddpm.image_size, ddpm.image_size)
    return ddpm, clip, device, precision, ddpm_file, clip_file


# --- edit ---------------------------------------------------------------------------------------
def cmd_edit(args) -> int:
    import torch

    from .models import AugmentSettings, Guide, edit

    if args.init_image is None:
        if args.mask is not None:
            raise CLIError("--mask given without -i/--init_image: give the image the mask belongs to")
        image_path, mask_path, example_prompt = find_example()
        args.init_image, args.mask = str(image_path), (str(mask_path) if mask_path else None)
        if args.prompt is None:
            args.prompt = example_prompt
        log.info("no -i/--mask: editing the bundled example %s with the prompt %r", image_path.name, args.prompt)
    if args.prompt is None:
        raise CLIError("-p/--prompt is required with -i (use -p \"\" to fill the region without text "
                       "guidance)")
    for name in ("batch_size", "iterations_num", "aug_num"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} = {getattr(args, name)}: it must be at least 1")
    if args.skip_timesteps < 0:
        raise CLIError(f"--skip_timesteps = {args.skip_timesteps}: it must be >= 0")
    check_weights(args, ("clip_guidance_lambda", "range_lambda", "lpips_sim_lambda", "l2_sim_lambda"))
    check_context(args.context)
    steps = count_steps(args.timestep_respacing)
    if args.skip_timesteps >= steps:
        raise CLIError(f"--skip_timesteps {args.skip_timesteps} with --timestep_respacing "
                       f"{args.timestep_respacing} ({steps} steps) leaves nothing to do: use fewer than "
                       f"{steps} skipped steps")
    suffix = Path(args.output_file).suffix.lower() or ".png"
    stem = Path(args.output_file).stem
    if Path(args.output_file).name != args.output_file:
        raise CLIError(f"-o/--output_file {args.output_file!r} must be a file name; use --output_path for "
                       "the folder")
    check_output_dir(args.output_path)

    image, alpha = load_image(args.init_image, with_alpha=True)
    h, w = image.shape[-2:]
    if args.mask is not None:
        mask = checked_mask(args.mask, (h, w), args.invert_mask)
        mask_source = "mask file"
    elif (own := transparent_region(alpha)) is not None:
        log.info("no --mask: editing the transparent pixels of %s (ComfyUI's convention)", args.init_image)
        mask = torch.from_numpy((~own if args.invert_mask else own).astype("float32"))[None]
        mask_source = "transparency of the image"
    else:
        if args.invert_mask:
            log.warning("--invert_mask without --mask: the whole image is edited")
        mask = torch.ones(1, h, w)
        mask_source = "whole image"

    prompt = args.prompt
    need_clip = bool(prompt.strip())
    if not need_clip:
        log.info("empty prompt: no CLIP guidance (the region is filled from the surroundings), no ranking")
    ddpm, clip, device, precision, ddpm_file, clip_file = load_models(
        args, need_ddpm=True, need_clip=need_clip, respacing=args.timestep_respacing)

    local = args.local_clip_guided_diffusion
    bg_loss = args.background_preservation_loss
    guide = Guide(clip=clip, prompt=prompt, clip_lambda=args.clip_guidance_lambda,
                  range_lambda=args.range_lambda, augment=AugmentSettings(num_views=args.aug_num),
                  lpips_lambda=args.lpips_sim_lambda if bg_loss else 0.0,
                  l2_lambda=args.l2_sim_lambda if bg_loss else 0.0, fast=args.fast)
    enforce = args.enforce_background and not local  # the official code never pastes in Algorithm 1

    # Folders are made when there is something to put in them: a run that fails (out of memory, a bad
    # file) before its first result leaves no empty ranked/ or assets/ behind.
    out_dir = Path(args.output_path)
    ranked_dir = out_dir / "ranked"
    assets_dir = out_dir / "assets"
    stale = [p for p in ranked_dir.glob(f"*_{stem}_i_*_b_*{suffix}")] if ranked_dir.is_dir() else []
    if stale:
        log.warning("%s already holds %d ranked result(s) named *_%s_i_*: they are kept; %s lists this "
                    "run's files", ranked_dir, len(stale), stem, out_dir / f"{stem}.json")

    k = ddpm.num_steps - args.skip_timesteps
    algorithm = ("Algorithm 1 (local CLIP-guided diffusion)" if local else
                 "Algorithm 3 (DDIM)" if args.ddim else "Algorithm 2 (DDPM)")
    params = parameters(args)
    record = {
        "command": "edit", "argv": args.argv, "parameters": params,
        "resolved": {"init_image": str(Path(args.init_image).resolve()),
                     "mask": str(Path(args.mask).resolve()) if args.mask else None, "mask_source": mask_source,
                     "model": str(ddpm_file), "clip": str(clip_file) if clip_file else None,
                     "device": str(device), "precision": precision,
                     "clip_precision": clip.precision if clip is not None else None, "algorithm": algorithm,
                     "blend": not local, "enforce_background": enforce,
                     "model_image_size": ddpm.image_size, "respaced_steps": ddpm.num_steps,
                     "denoising_steps": k, "image_size": [w, h],
                     "score": "D_CLIP of the result inside the mask (lower is better)"},
        "seeding": "iteration i uses seed + i; result b of an iteration uses the engine's generator "
                   "(seed + i, b), so `--seed S+i --iterations_num 1 --batch_size B` reproduces iteration i",
        "results": [], "interrupted": False, "finished_iterations": 0,
    }
    json_path = out_dir / f"{stem}.json"
    sheet_path = out_dir / f"{stem}_sheet.png"
    results: list[dict] = []
    pil_results: dict[str, object] = {}
    t0 = time.time()

    def finalize():
        out_dir.mkdir(parents=True, exist_ok=True)
        order = sorted(range(len(results)), key=lambda j: (results[j]["score"] is None,
                                                           results[j]["score"] or 0.0, j))
        for rank_, j in enumerate(order, 1):
            results[j]["rank"] = rank_
        record["results"] = [results[j] for j in order]
        record["elapsed_s"] = round(time.time() - t0, 2)
        write_json(json_path, record)
        tiles = [(to_pil(image[0]), "source"), (mask_overlay(image, mask), "mask")]
        for j in order:
            r = results[j]
            s = "" if r["score"] is None else f"  {r['score']:.4f}"
            tiles.append((pil_results[r["file"]], f"#{r['rank']}{s}  i{r['iteration']} b{r['batch_index']}"))
        contact_sheet(tiles, sheet_path, title=f"{prompt!r}  ({algorithm}, seed {args.seed})")
        return order

    bar = StepBar(args.iterations_num * k, "sampling")
    if device.type == "cpu":
        bar.on_first_step = lambda seconds: log.info("%s", cpu_estimate(
            seconds, batch=args.batch_size, chunk=args.batch_size, steps=k, iterations=args.iterations_num,
            respacing=args.timestep_respacing, skip=args.skip_timesteps))
    if args.save_video:
        bar.frames = []
    interrupted = False
    try:
        for it in range(args.iterations_num):
            seed = args.seed + it
            if bar.frames is not None:
                bar.frames = []
            try:
                out = edit(ddpm, image, mask, guide, skip_timesteps=args.skip_timesteps, seed=seed,
                           batch_size=args.batch_size, ddim=args.ddim, blend=not local,
                           enforce_background=enforce, context=args.context, max_batch=args.batch_size,
                           callback=bar)
            except KeyboardInterrupt:
                interrupted = True
                break
            scores = None
            if need_clip:
                from .models.apps import clip_scores
                scores = clip_scores(clip, out, mask, prompt).tolist()
            ranked_dir.mkdir(parents=True, exist_ok=True)
            if args.export_assets and it == 0:  # with the first results
                assets_dir.mkdir(exist_ok=True)
                to_pil(image[0]).save(assets_dir / f"{stem}{suffix}")
                to_pil(mask.expand(3, -1, -1)).save(assets_dir / f"{stem}_mask{suffix}")
            for b in range(out.shape[0]):
                name = f"{stem}_i_{it}_b_{b}{suffix}"
                score = None if scores is None else float(scores[b])
                pil = to_pil(out[b])
                pil.save(out_dir / name)
                ranked_name = f"{score_token(score)}_{name}"
                pil.save(ranked_dir / ranked_name)
                if args.export_assets:
                    pil.save(assets_dir / name)
                if args.save_video and bar.frames:
                    frames = [to_pil(f[b]) for f in bar.frames]
                    frames[0].save(out_dir / f"{stem}_i_{it}_b_{b}.gif", save_all=True,
                                   append_images=frames[1:], duration=80, loop=0)
                pil_results[name] = pil
                results.append({"iteration": it, "batch_index": b, "seed": seed, "result_index": b,
                                "score": score, "file": name, "ranked_file": f"ranked/{ranked_name}",
                                "size": [pil.width, pil.height]})
            record["finished_iterations"] = it + 1
            finalize()  # everything finished so far is on disk with its JSON and sheet
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if interrupted:
        record["interrupted"] = True
        log.warning("interrupted: keeping the %d finished result(s) of %d iteration(s)",
                    len(results), record["finished_iterations"])
    order = finalize()
    if results:
        best = results[order[0]]
        summary.info("%d result(s) in %s (ranked best first in %s), contact sheet %s, parameters %s",
                     len(results), out_dir, ranked_dir, sheet_path, json_path)
        summary.info("best: %s%s", out_dir / best["ranked_file"],
                     "" if best["score"] is None else f" (D_CLIP {best['score']:.4f})")
    else:
        summary.info("no finished result; parameters in %s", json_path)
    return 130 if interrupted else 0


# --- extrapolate --------------------------------------------------------------------------------
def cmd_extrapolate(args) -> int:
    from .models.apps import extrapolate

    if args.init_image is None:
        image_path, _, example_prompt = find_example()
        args.init_image = str(image_path)
        if args.prompt is None:
            args.prompt = example_prompt
    prompts = {}
    for d in ("left", "right", "up", "down"):
        v = getattr(args, d)
        if v is None:
            continue
        if v is True:
            if args.prompt is None:
                raise CLIError(f"--{d} without a prompt needs -p PROMPT (or write --{d} 'PROMPT')")
            v = args.prompt
        prompts[d] = v
    if not prompts:
        raise CLIError("name at least one side to extend: --left/--right/--up/--down PROMPT")
    if args.aug_num < 1:
        raise CLIError(f"--aug_num = {args.aug_num}: it must be at least 1")
    check_weights(args, ("clip_guidance_lambda", "range_lambda"))
    if Path(args.output_file).name != args.output_file:
        raise CLIError(f"-o/--output_file {args.output_file!r} must be a file name; use --output_path")
    count_steps(args.timestep_respacing)
    check_output_dir(args.output_path)
    image = load_image(args.init_image)
    need_clip = any(p.strip() for p in prompts.values())
    ddpm, clip, device, precision, ddpm_file, clip_file = load_models(
        args, need_ddpm=True, need_clip=need_clip, respacing=args.timestep_respacing)
    bar = StepBar(None, "extrapolating")
    t0 = time.time()
    try:
        out = extrapolate(ddpm, clip, image, prompts, args.amount, k_min=args.k_min, k_max=args.k_max,
                          final_k=args.final_k, seed=args.seed, clip_lambda=args.clip_guidance_lambda,
                          range_lambda=args.range_lambda, num_views=args.aug_num, ddim=args.ddim,
                          callback=bar)
    except KeyboardInterrupt:
        bar.close()
        log.warning("interrupted: nothing saved")
        return 130
    bar.close()
    out_dir = Path(args.output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / args.output_file
    pil = to_pil(out[0])
    pil.save(out_path)
    json_path = out_path.with_suffix(".json")
    write_json(json_path, {
        "command": "extrapolate", "argv": args.argv,
        "parameters": parameters(args),
        "resolved": {"init_image": str(Path(args.init_image).resolve()), "prompts": prompts,
                     "model": str(ddpm_file), "clip": str(clip_file) if clip_file else None,
                     "device": str(device), "precision": precision, "respaced_steps": ddpm.num_steps},
        "input_size": [image.shape[-1], image.shape[-2]], "output_size": [pil.width, pil.height],
        "output": out_path.name, "elapsed_s": round(time.time() - t0, 2)})
    summary.info("extended %dx%d to %dx%d: %s (parameters %s)", image.shape[-1], image.shape[-2],
                 pil.width, pil.height, out_path, json_path)
    return 0


# --- rank ---------------------------------------------------------------------------------------
def collect_images(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for it in items:
        p = Path(it).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise CLIError(f"{it}: no such file or folder")
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_EXTS)}) in {', '.join(items)}")
    return files


def cmd_rank(args) -> int:
    import torch

    from .models.apps import clip_scores

    if not args.prompt.strip():
        raise CLIError("-p/--prompt is empty: ranking needs the text the images should match")
    files = collect_images(args.images)
    check_output_dir(args.output_path)
    for f in files:  # every input readable (and the mask selecting a pixel of each) before CLIP is loaded
        img = load_image(f)
        if args.mask and not (load_mask(args.mask, tuple(img.shape[-2:]), args.invert_mask) > 0).any():
            raise CLIError(f"the mask {args.mask} selects no pixel of {f.name}")
    _, clip, device, precision, _, clip_file = load_models(args, need_ddpm=False, need_clip=True)
    from tqdm.auto import tqdm
    scores: list[float] = []
    for f in tqdm(files, desc="scoring", unit="image", file=sys.stderr, dynamic_ncols=True):
        img = load_image(f)
        mask = load_mask(args.mask, tuple(img.shape[-2:]), args.invert_mask) if args.mask else None
        with torch.no_grad():
            scores.append(float(clip_scores(clip, img, mask, args.prompt)[0]))
    order = sorted(range(len(files)), key=lambda j: (scores[j], j))
    out_dir = Path(args.output_path)
    ranked_dir = out_dir / "ranked"
    ranked_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for rank_, j in enumerate(order, 1):
        copied = None
        if not args.top_k or rank_ <= args.top_k:
            copied = ranked_dir / f"{score_token(scores[j])}_{files[j].name}"
            shutil.copy2(files[j], copied)
        entries.append({"rank": rank_, "score": scores[j], "source": str(files[j].resolve()),
                        "file": None if copied is None else f"ranked/{copied.name}"})
    json_path = out_dir / "rank.json"
    write_json(json_path, {"command": "rank", "argv": args.argv,
                           "parameters": parameters(args),
                           "resolved": {"clip": str(clip_file), "device": str(device), "precision": precision,
                                        "score": "D_CLIP inside the mask (lower is better)"},
                           "results": entries})
    summary.info("ranked %d image(s) in %s (JSON %s); best: %s (D_CLIP %.4f)", len(files), ranked_dir,
                 json_path, files[order[0]], scores[order[0]])
    return 0


# --- fidelity -----------------------------------------------------------------------------------
COMFYUI_FIX = ("--sd-checkpoint loads the Stable Diffusion checkpoint with ComfyUI: give --comfyui DIR (or set "
               "COMFYUI_PATH) naming a ComfyUI installation, and run this command with a Python that has ComfyUI's "
               "requirements (pip install -r DIR/requirements.txt)")


def import_comfyui(path: str | None, device) -> None:
    """Load ComfyUI through the host adapter (host/sd.py); its errors as one CLI error line."""
    from .host import sd as host_sd
    try:
        host_sd.import_comfyui(path, device)
    except ValueError as e:
        raise CLIError(f"--comfyui {e}. {COMFYUI_FIX}") from None
    except ImportError as e:
        raise CLIError(f"{e}. {COMFYUI_FIX}") from None


def center_crop(x, ratio: int):
    """[B, C, H, W] → sides cropped to multiples of ``ratio`` around the centre (as ComfyUI's VAE encode)."""
    h, w = x.shape[-2:]
    hh, ww = h // ratio * ratio, w // ratio * ratio
    return x[..., (h - hh) // 2:(h - hh) // 2 + hh, (w - ww) // 2:(w - ww) // 2 + ww]


def _slug(text: str) -> str:
    import re
    return re.sub(r"[^a-z0-9.]+", "_", text.lower()).strip("_")


def sdedit_sweep(args, ckpt: Path, inv_file: Path | None, image, mask, prompt: str, t0s: list[float],
                 record: dict):
    """The SDEdit half of ``fidelity``: load the checkpoint with ComfyUI, invert -i (or load --inversion), and
    list the runs. Returns (runs, the inversion's source [1, 3, H, W], the mask at its size)."""
    from .host import sd as host_sd
    from .models import inversion as ni
    log.info("loading %s with ComfyUI", ckpt)
    try:
        model, sd_clip, vae = host_sd.load_checkpoint(ckpt)
    except ValueError as e:
        raise CLIError(f"--sd-checkpoint {e}") from None
    if inv_file is not None:
        inv = ni.Inversion.from_file(inv_file)
        guidance = inv.guidance if args.guidance is None else args.guidance
        inv.check_guidance(guidance)
        if args.mask is not None:
            mask = checked_mask(args.mask, tuple(inv.source.shape[1:3]), args.invert_mask)
    else:
        guidance = 7.5 if args.guidance is None else args.guidance
        ratio = int(getattr(vae, "spacial_compression_encode", lambda: 8)())
        if image.shape[-1] % ratio or image.shape[-2] % ratio:  # crop the mask as the VAE crops the image
            log.info("image cropped from %dx%d to multiples of %d around the centre for the VAE",
                     image.shape[-1], image.shape[-2], ratio)
            image = center_crop(image, ratio)
            mask = None if mask is None else center_crop(mask, ratio)
        steps = args.steps or 50
        sd = host_sd.SDModel(model, grad=args.inner_steps > 0)
        bar = StepBar(ni.invert_steps(steps, args.inner_steps), "NULL-text inversion")
        try:
            inv, _ = host_sd.invert_image(sd, sd_clip, vae, image.movedim(1, -1), args.source_prompt.strip(),
                                          steps=steps, guidance=guidance, inner_steps=args.inner_steps, callback=bar)
        finally:
            bar.close()
        record["inversion_report"] = inv.report()
        if args.save_inversion:
            inv.to_file(Path(args.save_inversion).expanduser())
            log.info("saved the inversion to %s", args.save_inversion)
    source = inv.source.movedim(-1, 1).float()
    record["resolved"].update({"source_prompt": inv.prompt, "steps": inv.steps, "guidance": guidance,
                               "inversion": str(inv_file.resolve()) if inv_file else None,
                               "source_size": [source.shape[-1], source.shape[-2]]})
    cond = host_sd.encode_text(sd_clip, prompt)
    sd = host_sd.SDModel(model)
    runs = ni.sdedit_runs(sd, inv, cond, t0s, guidance, args.seed, lambda z: sd.decode_pixels(vae, z),
                          args.plain_sdedit)
    return runs, source, mask


def cmd_fidelity(args) -> int:
    import torch

    from .models import AugmentSettings, Guide
    from .models import fidelity as fid

    sd_mode = args.sd_checkpoint is not None
    if not sd_mode:
        for flag, value in (("--inversion", args.inversion), ("--source-prompt", args.source_prompt),
                            ("--save-inversion", args.save_inversion)):
            if value is not None:
                raise CLIError(f"{flag} belongs to the SDEdit sweep: give --sd-checkpoint FILE too")
        if args.init_image is None and args.mask is None:
            image_path, mask_path, example_prompt = find_example()
            args.init_image, args.mask = str(image_path), (str(mask_path) if mask_path else None)
            if args.prompt is None:
                args.prompt = example_prompt
            log.info("no -i/--mask: sweeping the bundled example %s with the prompt %r", image_path.name,
                     args.prompt)
        if args.init_image is None:
            raise CLIError("--mask given without -i/--init_image: give the image the mask belongs to")
        if args.mask is None:
            raise CLIError("the Blended Diffusion sweep needs --mask MASK (the region to edit and score); for the "
                           "SDEdit sweep give --sd-checkpoint FILE")
    if args.prompt is None or not args.prompt.strip():
        raise CLIError("-p/--prompt is required: the target prompt every result is scored against")
    prompt = args.prompt.strip()
    if args.aug_num < 1:
        raise CLIError(f"--aug_num = {args.aug_num}: it must be at least 1")
    check_weights(args, ("clip_guidance_lambda", "range_lambda"))
    check_context(args.context)
    skips: list[int] = []
    if args.mask is not None:
        n = count_steps(args.timestep_respacing)
        skips = [int(v) for v in fid.parse_values(args.skip_timesteps, "--skip-timesteps", 0, n - 1)]
    ckpt = inv_file = None
    t0s: list[float] = []
    if sd_mode:
        ckpt = Path(args.sd_checkpoint).expanduser()
        if not ckpt.is_file():
            raise CLIError(f"--sd-checkpoint {args.sd_checkpoint}: file not found")
        if args.inversion is not None:
            inv_file = Path(args.inversion).expanduser()
            if not inv_file.is_file():
                raise CLIError(f"--inversion {args.inversion}: file not found (save one with --save-inversion or "
                               "ComfyUI's Save Inversion)")
            if args.init_image is not None:
                log.warning("-i %s ignored: the inversion %s holds its own source image", args.init_image, inv_file)
            if args.steps is not None:
                log.warning("--steps ignored: the inversion fixes the DDIM steps")
        elif args.init_image is None:
            raise CLIError("--sd-checkpoint needs -i IMAGE to invert (with --source-prompt CAPTION), or --inversion "
                           "FILE")
        elif not (args.source_prompt or "").strip():
            raise CLIError("--source-prompt CAPTION is required to invert -i: NULL-text inversion starts from a "
                           "caption of the image")
        if args.steps is not None and args.steps < 2:
            raise CLIError(f"--steps = {args.steps}: it must be at least 2")
        if args.inner_steps < 0:
            raise CLIError(f"--inner-steps = {args.inner_steps}: it must be >= 0")
        if args.guidance is not None and not 1 <= args.guidance < float("inf"):
            raise CLIError(f"--guidance = {args.guidance}: it must be a finite number >= 1")
        t0s = fid.parse_values(args.t0, "--t0", 1e-6, 1.0)
    out_dir = check_output_dir(args.output_path)
    if args.save_inversion:
        check_output_dir(Path(args.save_inversion).expanduser().parent, "--save-inversion")

    device = resolve_device(args.device, args.gpu_id)
    if sd_mode:  # before any model is loaded: a missing ComfyUI fails fast
        import_comfyui(args.comfyui, device)
    image = load_image(args.init_image) if args.init_image is not None and inv_file is None else None
    mask = None
    if args.mask is not None and image is not None:
        mask = checked_mask(args.mask, tuple(image.shape[-2:]), args.invert_mask)
    ddpm, clip, device, precision, ddpm_file, clip_file = load_models(
        args, need_ddpm=bool(skips), need_clip=True, respacing=args.timestep_respacing)
    record = {"command": "fidelity", "argv": args.argv, "parameters": parameters(args),
              "resolved": {"init_image": str(Path(args.init_image).resolve()) if image is not None else None,
                           "mask": str(Path(args.mask).resolve()) if args.mask else None,
                           "model": str(ddpm_file) if ddpm_file else None, "clip": str(clip_file),
                           "device": str(device), "precision": precision, "prompt": prompt,
                           "sd_checkpoint": str(ckpt.resolve()) if ckpt else None,
                           "lpips": "to the source, whole image",
                           "clip_distance": "D_CLIP to the prompt inside the mask" if args.mask else
                                            "D_CLIP to the prompt, whole image"},
              "rows": [], "interrupted": False}
    t_start = time.time()
    runs: list = []
    context = torch.inference_mode() if sd_mode else contextlib.nullcontext()  # ComfyUI's own mode for its models
    with context:
        if sd_mode:
            runs, source, mask = sdedit_sweep(args, ckpt, inv_file, image, mask, prompt, t0s, record)
        else:
            source = image
        if skips:
            guide = Guide(clip=clip, prompt=prompt, clip_lambda=args.clip_guidance_lambda,
                          range_lambda=args.range_lambda, augment=AugmentSettings(num_views=args.aug_num))
            runs += fid.blended_runs(ddpm, guide, source, mask, skips, seed=args.seed, ddim=args.ddim,
                                     context=args.context)

        from tqdm.auto import tqdm
        rows, images = [], []
        bar = tqdm(total=len(runs), desc="fidelity curve", unit="result", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix_str(f"{runs[0].method} {label(runs[0].parameter, runs[0].value)}")
        try:
            for row, img in fid.sweep(runs, source, clip, prompt, mask):
                rows.append(row)
                images.append(img)
                bar.update()
                if len(rows) < len(runs):
                    nxt = runs[len(rows)]
                    bar.set_postfix_str(f"{nxt.method} {label(nxt.parameter, nxt.value)}")
        except KeyboardInterrupt:
            record["interrupted"] = True
        finally:
            bar.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path, csv_path = (out_dir / f"fidelity.{ext}" for ext in ("json", "png", "csv"))
    for k, (row, img) in enumerate(zip(rows, images), 1):
        entry = {"method": row.method, "parameter": row.parameter, "value": row.value, "lpips": row.lpips,
                 "clip_distance": row.clip_distance, "file": None}
        if args.save_images:
            name = f"{k:02d}_{_slug(row.method)}_{_slug(label(row.parameter, row.value))}.png"
            (out_dir / "fidelity_images").mkdir(exist_ok=True)
            to_pil(img[0]).save(out_dir / "fidelity_images" / name)
            entry["file"] = f"fidelity_images/{name}"
        record["rows"].append(entry)
    if rows:
        csv_path.write_text(fid.csv_text(rows))
        figure(rows, prompt).save(png_path)
    else:  # no curve from an earlier run may pass for this one's
        csv_path.unlink(missing_ok=True)
        png_path.unlink(missing_ok=True)
    record["elapsed_s"] = round(time.time() - t_start, 2)
    write_json(json_path, record)
    for row in rows:
        summary.info("%-34s %s: LPIPS %.4f, D_CLIP %.4f", row.method, label(row.parameter, row.value),
                     row.lpips, row.clip_distance)
    if record["interrupted"]:
        log.warning("interrupted: kept the %d finished result(s) of %d", len(rows), len(runs))
    if rows:
        summary.info("fidelity curve of %d result(s): plot %s, CSV %s (parameters %s)", len(rows), png_path,
                     csv_path, json_path)
    else:
        summary.info("no finished result; parameters in %s", json_path)
    return 130 if record["interrupted"] else 0


# --- run ----------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, str, object]:
    """'3.seed=5' → ('3', 'seed', 5); values are JSON when they parse, else strings."""
    key, sep, value = text.partition("=")
    node, dot, name = key.strip().partition(".")
    if not sep or not dot or not node or not name:
        raise CLIError(f"--set {text!r}: write NODE_ID.INPUT=VALUE, e.g. --set 3.seed=5")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return node, name.strip(), parsed


def find_workflow(name: str) -> Path:
    from .models.weights import PACK_ROOT
    p = Path(name).expanduser()
    if p.is_file():
        return p
    api = PACK_ROOT / "workflows" / "api"
    for cand in (api / name, api / f"{name}.json"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in api.glob("*.json")) if api.is_dir() else []
    raise CLIError(f"workflow {name!r} not found (neither a file nor one of workflows/api: "
                   f"{', '.join(known) or 'none'})")


def parse_overrides(workflow: dict, overrides: list[str]) -> dict:
    """--set texts → {node_id: {input: value}}, checked against the workflow."""
    out: dict[str, dict] = {}
    for text in overrides:
        node, name, value = parse_override(text)
        if node not in workflow:
            known = ", ".join(f"{k} ({v['class_type']})" for k, v in workflow.items())
            raise CLIError(f"--set {text!r}: the workflow has no node {node!r}; its nodes: {known}")
        inputs = workflow[node].get("inputs", {})
        if isinstance(inputs.get(name), list):
            raise CLIError(f"--set {text!r}: input {name!r} of node {node} ({workflow[node]['class_type']}) "
                           "is a link from another node, not a value")
        if name not in inputs:
            declared = _declared_inputs(workflow[node]["class_type"])
            if declared is not None and name not in declared:
                raise CLIError(f"--set {text!r}: node {node} ({workflow[node]['class_type']}) has no input "
                               f"{name!r}; its inputs: {', '.join(declared)}")
            log.warning("--set %s: input %r is not in the workflow's node %s; added", text, name, node)
        out.setdefault(node, {})[name] = value
    return out


def _declared_inputs(class_type: str) -> list[str] | None:
    """Inputs a pack node declares (required + optional), or None for other nodes."""
    from .nodes import NODE_CLASS_MAPPINGS
    cls = NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return None
    types = cls.INPUT_TYPES()
    return [*types.get("required", {}), *types.get("optional", {})]


@contextlib.contextmanager
def _env(name: str, value: str | None):
    import os
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def cmd_run(args) -> int:
    from .models.weights import PACK_ROOT
    api = PACK_ROOT / "workflows" / "api"
    if args.list:
        for q in sorted(api.glob("*.json")):
            summary.info("%s", q.stem)
        return 0
    path = find_workflow(args.workflow)
    try:
        workflow = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(workflow, dict) or not all(isinstance(v, dict) and "class_type" in v
                                                 for v in workflow.values()):
        raise CLIError(f"{path}: not an API-format workflow (a dict of node id → {{class_type, inputs}}); "
                       "in ComfyUI use 'Export (API)' to save one")
    workflow = {str(k): v for k, v in workflow.items()}
    overrides = parse_overrides(workflow, args.overrides)
    if args.input_dir is not None and not Path(args.input_dir).is_dir():
        raise CLIError(f"--input_dir {args.input_dir}: no such folder")
    from .models.weights import ENV_MODELS_DIR
    from .nodes import runner
    out_dir = check_output_dir(args.output_path)
    created = made_dirs(out_dir)
    t0 = time.time()
    try:
        with _env(ENV_MODELS_DIR, str(Path(args.models_dir).expanduser().resolve()) if args.models_dir else None):
            result = runner.run_workflow(workflow, input_dir=args.input_dir, output_dir=str(out_dir),
                                         overrides=overrides)
    except BaseException as e:
        remove_empty(created)
        if isinstance(e, KeyboardInterrupt):
            log.warning("interrupted")
            return 130
        if isinstance(e, FileNotFoundError):
            raise CLIError(str(e)) from None
        raise
    files = [Path(f) for f in result.files]
    texts = {nid: ui.get("text") for nid, ui in result.ui.items() if ui.get("text")}
    for nid, text in texts.items():
        for t in text:
            summary.info("node %s: %s", nid, t)
    json_path = out_dir / f"{path.stem}.run.json"
    write_json(json_path, {
        "command": "run", "argv": args.argv, "workflow": str(path.resolve()), "overrides": overrides,
        "prompt": {k: v for k, v in workflow.items()}, "applied": _applied(workflow, overrides),
        "outputs": [str(f) for f in files], "node_text": texts, "elapsed_s": round(time.time() - t0, 2)})
    summary.info("ran %s: %d file(s) saved in %s (record %s)", path.name, len(files), out_dir, json_path)
    return 0


def _applied(workflow: dict, overrides: dict) -> dict:
    """The workflow's inputs after the overrides (what actually ran)."""
    return {nid: {**node.get("inputs", {}), **overrides.get(nid, {})} for nid, node in workflow.items()}


# --- weights ------------------------------------------------------------------------------------
def cmd_weights(args) -> int:
    from .models import weights as W
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
        summary.info("%-28s %s", wf.name, found if found else
                     f"MISSING: download {wf.url} into {dirs[0]}")
        summary.info("%-28s looked in: %s", "", ", ".join(str(d) for d in dirs))
    return 1 if missing else 0


def cmd_bench(args) -> int:
    from .bench.command import cmd_bench as run
    return run(args)


COMMANDS = {"edit": cmd_edit, "extrapolate": cmd_extrapolate, "rank": cmd_rank, "fidelity": cmd_fidelity,
            "run": cmd_run, "weights": cmd_weights, "bench": cmd_bench}


@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool):
    root = logging.getLogger("blended_diffusion")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    old = root.level, root.propagate, summary.level, summary.propagate
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    root.propagate = False
    summary.setLevel(logging.INFO)
    summary.addHandler(out)
    summary.propagate = False
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm(loggers=[root, summary]):
            yield
    finally:
        root.removeHandler(handler)
        summary.removeHandler(out)
        root.level, root.propagate, summary.level, summary.propagate = old


def main(argv: list[str] | None = None) -> int:
    argv = _implicit_edit(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    from .models.checkpoint import CheckpointError
    from .models.weights import WeightsError
    with _logging(args.verbose, args.quiet):
        try:
            return COMMANDS[args.command](args)
        except (CLIError, WeightsError, CheckpointError, ValueError) as e:
            if args.verbose:
                log.exception("error")
            log.error("error: %s", e)
            return 1
        except KeyboardInterrupt:
            log.warning("interrupted")
            return 130
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, torch's CPU allocator, oneDNN, Python
            from .models.memory import out_of_memory
            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
            kind = out_of_memory(e)
            if "out of memory" not in text.lower() and kind is None:
                raise
            if args.verbose:
                log.exception("error")
            if "out of memory" not in text.lower():  # raised outside the sampler's batch splitting
                text = (f"out of memory{', most likely' if kind == 'likely' else ''} ({text}): use a smaller "
                        "--batch_size, fewer --aug_num views, --precision fp16/bf16 on a GPU or --clip_precision "
                        "bf16, or close other programs")
            log.error("error: %s", text)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
