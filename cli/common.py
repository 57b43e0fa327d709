"""What several subcommands share: argument groups and checks, device and precision, weight files and model
loading, the output folder, the JSON records, the step progress bar, and ComfyUI for the Stable Diffusion
sweeps. Checks the engine already has are the engine's own functions (models/ddpm.py ``count_steps``,
models/edit.py ``check_skip``, models/region.py ``check_context``), their ValueError turned into a CLIError."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from . import CLIError

log = logging.getLogger("blended_diffusion.cli")
summary = logging.getLogger("blended_diffusion.cli.summary")  # final lines, to stdout

# The bundled example that `edit` / `extrapolate` / `fidelity` use without -i: (image, mask, prompt), first found.
EXAMPLE_CANDIDATES = (
    ("bd_scene.png", "bd_scene_mask.png", "a watermelon"),
)
WEIGHTS_HINT = ("`blended-diffusion weights` lists the files and the folders searched, `blended-diffusion weights "
                "--download` fetches them; or give the files' paths with --model / --clip")
COMFYUI_FIX = ("--sd-checkpoint loads the Stable Diffusion checkpoint with ComfyUI: give --comfyui DIR (or set "
               "COMFYUI_PATH) naming a ComfyUI installation, and run this command with a Python that has ComfyUI's "
               "requirements (pip install -r DIR/requirements.txt)")


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


def add_model_args(p: argparse.ArgumentParser, *, ddpm: bool = True, clip: bool = True):
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


def add_sd_checkpoint_args(g) -> None:
    """--sd-checkpoint and --comfyui: a Stable Diffusion checkpoint loaded with ComfyUI (fidelity, bench)."""
    g.add_argument("--sd-checkpoint", dest="sd_checkpoint", metavar="FILE", default=None,
                   help="an SD1.x/SD2.x checkpoint (.safetensors/.ckpt with its VAE and text encoder), loaded "
                        "with ComfyUI's comfy.sd")
    g.add_argument("--comfyui", metavar="DIR", default=None,
                   help="the ComfyUI installation to load it with; this Python must have its requirements "
                        "(default: $COMFYUI_PATH)")


def add_diffusion_args(p: argparse.ArgumentParser):
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


def add_context_arg(p: argparse.ArgumentParser):
    p.add_argument("--context", type=float, default=0.25,
                   help="margin around the mask's bounding box, as a fraction of the box on each side: the square "
                        "the model works on, resized to the model size, so a small mask gets the model's "
                        "resolution (enlarged at most 4x) (default 0.25)")


def add_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, with the defaults shown by -h."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


# --- checks -------------------------------------------------------------------------------------
def engine_check(check, *args, **kwargs):
    """An engine check (it raises ValueError with the fix) as a CLI error."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise CLIError(str(e)) from None


def count_steps(respacing: str) -> int:
    """Number of respaced steps (models/ddpm.py's count), checked before any model is loaded."""
    from ..models.ddpm import count_steps as engine_count
    return engine_check(engine_count, respacing, name="--timestep_respacing")


def check_skip(skip_timesteps: int, respacing: str) -> int:
    """``--skip_timesteps`` against ``--timestep_respacing`` (models/edit.py's check): the steps left to run."""
    from ..models.edit import check_skip as engine_skip
    steps = count_steps(respacing)
    return engine_check(engine_skip, skip_timesteps, steps, name="--skip_timesteps",
                        schedule=f"--timestep_respacing {respacing}")


def check_context(context: float) -> None:
    from ..models.region import check_context as engine_context
    engine_check(engine_context, context, name="--context")


def check_at_least_one(args, names: tuple[str, ...]) -> None:
    """Counts (results, iterations, views) are at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} = {getattr(args, name)}: it must be at least 1")


def check_weights(args, names: tuple[str, ...]) -> None:
    """Loss weights are >= 0 (a negative CLIP weight would push the region away from the prompt)."""
    for name in names:
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):  # NaN and inf fail too
            raise CLIError(f"--{name} = {value}: it must be a finite number >= 0 (0 turns the term off)")


def check_file_name(name: str) -> None:
    """-o/--output_file names a file, not a path."""
    if Path(name).name != name:
        raise CLIError(f"-o/--output_file {name!r} must be a file name; use --output_path for the folder")


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


def use_example(args, what: str) -> None:
    """No -i/--mask: the bundled example's image, mask and (unless -p) prompt go into ``args``."""
    image_path, mask_path, example_prompt = find_example()
    args.init_image = str(image_path)
    if hasattr(args, "mask"):
        args.mask = str(mask_path) if mask_path else None
    if args.prompt is None:
        args.prompt = example_prompt
    log.info("no -i/--mask: %s the bundled example %s with the prompt %r", what, image_path.name, args.prompt)


def find_example() -> tuple[Path, Path | None, str]:
    """The bundled example: (image, mask, prompt)."""
    from ..models.weights import EXAMPLES_DIR
    for img, mask, prompt in EXAMPLE_CANDIDATES:
        if (EXAMPLES_DIR / img).is_file():
            m = EXAMPLES_DIR / mask if mask and (EXAMPLES_DIR / mask).is_file() else None
            return EXAMPLES_DIR / img, m, prompt
    raise CLIError(f"the bundled example image is missing from {EXAMPLES_DIR}; give an image with "
                   "-i IMAGE (and --mask MASK, -p PROMPT)")


# --- device and models --------------------------------------------------------------------------
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


def _wanted_weights(args, need_ddpm: bool, need_clip: bool) -> list[tuple[str, str | None, str]]:
    """(role, the path given by flag or None, default weight key) of each file the command needs."""
    wanted = []
    if need_ddpm:
        key = "ddpm_512" if getattr(args, "model_output_size", 256) == 512 else "ddpm_256"
        wanted.append(("ddpm", args.model, key))
    if need_clip:
        wanted.append(("clip", args.clip, "clip"))
    return wanted


def _weights_listing(items) -> str:
    from ..models import weights as W
    return "; ".join(f"{wf.name} ({wf.description}) from {wf.url} into {W.search_dirs(wf.folder)[0]}"
                     for _, wf in items)


def resolve_weights(args, *, need_ddpm: bool, need_clip: bool) -> tuple[Path | None, Path | None]:
    """(DDPM file or None, CLIP file or None). Every file the command needs is checked before anything is
    downloaded or loaded, and all that are missing are named in one error (a --model/--clip path that does not
    exist, default files with --offline or after a failed download: each with its URL and folder). Missing
    default files are downloaded otherwise."""
    from ..models import weights as W
    found: dict[str, Path] = {}
    bad_paths: list[str] = []
    missing: list = []  # (role, WeightFile)
    for role, explicit, key in _wanted_weights(args, need_ddpm, need_clip):
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
    if bad_paths:
        also = f"; also missing: {_weights_listing(missing)}. {WEIGHTS_HINT}" if missing else ""
        raise CLIError("; ".join(bad_paths) + also)
    if missing and args.offline:
        raise CLIError(f"{len(missing)} weight file(s) missing and --offline forbids downloads: "
                       f"{_weights_listing(missing)}. Download them into those folders. {WEIGHTS_HINT}")
    for i, (role, wf) in enumerate(missing):
        try:
            found[role] = W.ensure(wf)
        except W.WeightsError as e:
            rest = missing[i + 1:]
            also = f" Also missing: {_weights_listing(rest)}." if rest else ""
            raise CLIError(f"{e}{also} {WEIGHTS_HINT}") from None
    return found.get("ddpm"), found.get("clip")


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


class Loaded:
    """What ``load_models`` returns: the models (None where not needed), where they run and their files."""

    def __init__(self, ddpm, clip, device, precision: str, ddpm_file: Path | None, clip_file: Path | None):
        self.ddpm, self.clip, self.device, self.precision = ddpm, clip, device, precision
        self.ddpm_file, self.clip_file = ddpm_file, clip_file

    def __iter__(self):  # ddpm, clip, device, precision, ddpm_file, clip_file = load_models(...)
        return iter((self.ddpm, self.clip, self.device, self.precision, self.ddpm_file, self.clip_file))


def _load_files(args, ddpm_file, clip_file, device, precision, respacing):
    """(ddpm or None, clip or None) with a progress bar; out of memory while loading is a CLI error."""
    from tqdm.auto import tqdm

    from ..models import load_clip, load_ddpm
    from ..models.memory import out_of_memory
    ddpm = clip = loading = None
    try:
        with tqdm(total=int(ddpm_file is not None) + int(clip_file is not None), desc="loading models",
                  unit="model", file=sys.stderr, dynamic_ncols=True) as bar:
            if ddpm_file is not None:
                loading = ddpm_file
                bar.set_postfix_str(ddpm_file.name)
                ddpm = load_ddpm(str(ddpm_file), respacing=respacing, precision=precision, device=device)
                bar.update()
            if clip_file is not None:
                loading = clip_file
                bar.set_postfix_str(clip_file.name)
                clip_precision = resolve_precision(getattr(args, "clip_precision", None) or args.precision, device)
                clip = load_clip(str(clip_file), device=device, precision=clip_precision)
                bar.update()
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"out of memory while loading {loading} ({first}): the {device.type.upper()} has too little "
                       "free memory for the model; close other programs, or use a smaller model (or --precision "
                       "fp16/bf16 on a GPU)") from None
    return ddpm, clip


def load_models(args, *, need_ddpm: bool, need_clip: bool, respacing: str | None = None) -> Loaded:
    """The models a command needs on its device (``Loaded``; unpacks as (ddpm, clip, device, precision,
    ddpm_file, clip_file)): device and precision resolved and announced, weight files found (or downloaded),
    then loaded with a progress bar."""
    device = resolve_device(args.device, getattr(args, "gpu_id", 0))
    precision = resolve_precision(args.precision, device)
    announce_device(device, args.device, precision)
    if device.type == "cpu":
        from ..models import memory
        memory.setup_cpu_process()  # keep freed memory: about 20% faster guided steps (models/memory.py)
    ddpm_file, clip_file = resolve_weights(args, need_ddpm=need_ddpm, need_clip=need_clip)
    ddpm, clip = _load_files(args, ddpm_file, clip_file, device, precision, respacing)
    if need_ddpm and getattr(args, "model", None) and ddpm.image_size != args.model_output_size \
            and args.model_output_size != 256:
        log.warning("--model_output_size %d ignored: %s is a %dx%d model", args.model_output_size,
                    ddpm_file, ddpm.image_size, ddpm.image_size)
    return Loaded(ddpm, clip, device, precision, ddpm_file, clip_file)


def import_comfyui(path: str | None, device) -> None:
    """Load ComfyUI through the host adapter (host/sd.py); its errors as one CLI error line."""
    from ..host import sd as host_sd
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


def vae_crop(vae, image, mask=None):
    """The image (and its mask) cropped to multiples of the VAE's downscale around the centre, as ComfyUI's VAE
    crops what it encodes; (image, mask)."""
    ratio = int(getattr(vae, "spacial_compression_encode", lambda: 8)())
    if image.shape[-1] % ratio or image.shape[-2] % ratio:
        log.info("image cropped from %dx%d to multiples of %d around the centre for the VAE",
                 image.shape[-1], image.shape[-2], ratio)
        image = center_crop(image, ratio)
        mask = None if mask is None else center_crop(mask, ratio)
    return image, mask


# --- outputs ------------------------------------------------------------------------------------
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


def resolved_path(path) -> str | None:
    return str(Path(path).resolve()) if path else None


def write_json(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def score_token(score: float | None) -> str:
    """The official ranked file-name prefix: the distance with 4 decimals, dot removed (sorts best first)."""
    return "none" if score is None or score != score else f"{score:.4f}".replace(".", "")


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
