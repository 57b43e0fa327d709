"""``edit``: the official code's command line (omriav/blended-diffusion main.py, its flags and defaults). Steps:
``check_inputs`` (every flag, before any file is read), ``prepare`` (image, mask, models, guide, record),
``run`` (the iterations, each saved with its ranking, JSON and contact sheet as it finishes), ``report``."""
from __future__ import annotations

import math
import time
from pathlib import Path

from ..render import to_pil
from . import CLIError
from .common import (StepBar, add_context_arg, add_diffusion_args, add_model_args, add_parser as new_parser,
                     check_at_least_one, check_context, check_file_name, check_output_dir, check_skip,
                     check_weights, load_models, log, parameters, resolved_path, score_token, summary, use_example,
                     write_json)
from .images import checked_mask, load_image, transparent_region


def add_parser(sub):
    e = new_parser(sub, "edit", help="edit the masked region of an image to match a prompt",
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
    add_context_arg(e)
    add_diffusion_args(e)
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
    add_model_args(e)
    return e


# --- the CPU estimate ---------------------------------------------------------------------------
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


# --- the contact sheet --------------------------------------------------------------------------
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


# --- the command --------------------------------------------------------------------------------
def check_inputs(args) -> int:
    """Every flag, before any file is read or model loaded; returns the denoising steps of each result."""
    if args.init_image is None:
        if args.mask is not None:
            raise CLIError("--mask given without -i/--init_image: give the image the mask belongs to")
        use_example(args, "editing")
    if args.prompt is None:
        raise CLIError("-p/--prompt is required with -i (use -p \"\" to fill the region without text "
                       "guidance)")
    check_at_least_one(args, ("batch_size", "iterations_num", "aug_num"))
    check_weights(args, ("clip_guidance_lambda", "range_lambda", "lpips_sim_lambda", "l2_sim_lambda"))
    check_context(args.context)
    steps = check_skip(args.skip_timesteps, args.timestep_respacing)
    check_file_name(args.output_file)
    check_output_dir(args.output_path)
    return steps


def read_image_and_mask(args):
    """(image [1, 3, H, W], mask [1, H, W], where the mask came from): the mask file, else the image's own
    transparent pixels, else the whole image."""
    import torch
    image, alpha = load_image(args.init_image, with_alpha=True)
    h, w = image.shape[-2:]
    if args.mask is not None:
        return image, checked_mask(args.mask, (h, w), args.invert_mask), "mask file"
    own = transparent_region(alpha)
    if own is not None:
        log.info("no --mask: editing the transparent pixels of %s (ComfyUI's convention)", args.init_image)
        return image, torch.from_numpy((~own if args.invert_mask else own).astype("float32"))[None], \
            "transparency of the image"
    if args.invert_mask:
        log.warning("--invert_mask without --mask: the whole image is edited")
    return image, torch.ones(1, h, w), "whole image"


class EditJob:
    """One ``edit`` run: its inputs and models (``prepare``), the iterations (``run``) and what is on disk."""

    def __init__(self, args):
        self.args = args
        self.stem = Path(args.output_file).stem
        self.suffix = Path(args.output_file).suffix.lower() or ".png"
        self.out_dir = Path(args.output_path)
        self.ranked_dir = self.out_dir / "ranked"
        self.assets_dir = self.out_dir / "assets"
        self.json_path = self.out_dir / f"{self.stem}.json"
        self.sheet_path = self.out_dir / f"{self.stem}_sheet.png"
        self.results: list[dict] = []
        self.pil_results: dict[str, object] = {}
        self.interrupted = False

    # --- prepare ------------------------------------------------------------------------------------
    def prepare(self) -> "EditJob":
        from ..models import AugmentSettings, Guide
        args = self.args
        self.image, self.mask, mask_source = read_image_and_mask(args)
        self.need_clip = bool(args.prompt.strip())
        if not self.need_clip:
            log.info("empty prompt: no CLIP guidance (the region is filled from the surroundings), no ranking")
        self.models = load_models(args, need_ddpm=True, need_clip=self.need_clip, respacing=args.timestep_respacing)
        self.local = args.local_clip_guided_diffusion
        bg_loss = args.background_preservation_loss
        self.guide = Guide(clip=self.models.clip, prompt=args.prompt, clip_lambda=args.clip_guidance_lambda,
                           range_lambda=args.range_lambda, augment=AugmentSettings(num_views=args.aug_num),
                           lpips_lambda=args.lpips_sim_lambda if bg_loss else 0.0,
                           l2_lambda=args.l2_sim_lambda if bg_loss else 0.0, fast=args.fast)
        self.enforce = args.enforce_background and not self.local  # the official code never pastes in Algorithm 1
        self.k = self.models.ddpm.num_steps - args.skip_timesteps
        self.algorithm = ("Algorithm 1 (local CLIP-guided diffusion)" if self.local else
                          "Algorithm 3 (DDIM)" if args.ddim else "Algorithm 2 (DDPM)")
        self.record = self._record(mask_source)
        self._warn_stale()
        return self

    def _record(self, mask_source: str) -> dict:
        args, m = self.args, self.models
        h, w = self.image.shape[-2:]
        return {
            "command": "edit", "argv": args.argv, "parameters": parameters(args),
            "resolved": {"init_image": resolved_path(args.init_image), "mask": resolved_path(args.mask),
                         "mask_source": mask_source, "model": str(m.ddpm_file),
                         "clip": str(m.clip_file) if m.clip_file else None, "device": str(m.device),
                         "precision": m.precision, "clip_precision": m.clip.precision if m.clip is not None else None,
                         "algorithm": self.algorithm, "blend": not self.local, "enforce_background": self.enforce,
                         "model_image_size": m.ddpm.image_size, "respaced_steps": m.ddpm.num_steps,
                         "denoising_steps": self.k, "image_size": [w, h],
                         "score": "D_CLIP of the result inside the mask (lower is better)"},
            "seeding": "iteration i uses seed + i; result b of an iteration uses the engine's generator "
                       "(seed + i, b), so `--seed S+i --iterations_num 1 --batch_size B` reproduces iteration i",
            "results": [], "interrupted": False, "finished_iterations": 0,
        }

    def _warn_stale(self) -> None:
        """Folders are made when there is something to put in them (a run that fails before its first result
        leaves no empty ranked/ or assets/ behind); ranked results of an earlier run are kept and named."""
        if not self.ranked_dir.is_dir():
            return
        stale = list(self.ranked_dir.glob(f"*_{self.stem}_i_*_b_*{self.suffix}"))
        if stale:
            log.warning("%s already holds %d ranked result(s) named *_%s_i_*: they are kept; %s lists this "
                        "run's files", self.ranked_dir, len(stale), self.stem, self.json_path)

    # --- run ----------------------------------------------------------------------------------------
    def step_bar(self) -> StepBar:
        args = self.args
        bar = StepBar(args.iterations_num * self.k, "sampling")
        if self.models.device.type == "cpu":
            bar.on_first_step = lambda seconds: log.info("%s", cpu_estimate(
                seconds, batch=args.batch_size, chunk=args.batch_size, steps=self.k, iterations=args.iterations_num,
                respacing=args.timestep_respacing, skip=args.skip_timesteps))
        if args.save_video:
            bar.frames = []
        return bar

    def run(self) -> "EditJob":
        """Every iteration, each saved (results, ranking, JSON, sheet) as it finishes; Ctrl-C keeps them."""
        bar = self.step_bar()
        t0 = time.time()
        try:
            for it in range(self.args.iterations_num):
                out = self.sample(it, bar)
                if out is None:
                    break
                self.save_iteration(it, out, bar.frames)
                self.record["finished_iterations"] = it + 1
                self.finalize(t0)  # everything finished so far is on disk with its JSON and sheet
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            bar.close()
        if self.interrupted:
            self.record["interrupted"] = True
            log.warning("interrupted: keeping the %d finished result(s) of %d iteration(s)",
                        len(self.results), self.record["finished_iterations"])
        self.order = self.finalize(t0)
        return self

    def sample(self, it: int, bar: StepBar):
        """Iteration ``it``'s results [B, 3, H, W], or None when Ctrl-C stopped it."""
        from ..models import edit
        args = self.args
        if bar.frames is not None:
            bar.frames = []
        try:
            return edit(self.models.ddpm, self.image, self.mask, self.guide, skip_timesteps=args.skip_timesteps,
                        seed=args.seed + it, batch_size=args.batch_size, ddim=args.ddim, blend=not self.local,
                        enforce_background=self.enforce, context=args.context, max_batch=args.batch_size,
                        callback=bar)
        except KeyboardInterrupt:
            self.interrupted = True
            return None

    def save_iteration(self, it: int, out, frames) -> None:
        args = self.args
        scores = None
        if self.need_clip:
            from ..models.apps import clip_scores
            scores = clip_scores(self.models.clip, out, self.mask, args.prompt).tolist()
        self.ranked_dir.mkdir(parents=True, exist_ok=True)
        if args.export_assets and it == 0:  # with the first results
            self.assets_dir.mkdir(exist_ok=True)
            to_pil(self.image[0]).save(self.assets_dir / f"{self.stem}{self.suffix}")
            to_pil(self.mask.expand(3, -1, -1)).save(self.assets_dir / f"{self.stem}_mask{self.suffix}")
        for b in range(out.shape[0]):
            self.save_result(it, b, out[b], None if scores is None else float(scores[b]), frames)

    def save_result(self, it: int, b: int, result, score: float | None, frames) -> None:
        args = self.args
        name = f"{self.stem}_i_{it}_b_{b}{self.suffix}"
        pil = to_pil(result)
        pil.save(self.out_dir / name)
        ranked_name = f"{score_token(score)}_{name}"
        pil.save(self.ranked_dir / ranked_name)
        if args.export_assets:
            pil.save(self.assets_dir / name)
        if args.save_video and frames:
            gif = [to_pil(f[b]) for f in frames]
            gif[0].save(self.out_dir / f"{self.stem}_i_{it}_b_{b}.gif", save_all=True, append_images=gif[1:],
                        duration=80, loop=0)
        self.pil_results[name] = pil
        self.results.append({"iteration": it, "batch_index": b, "seed": args.seed + it, "result_index": b,
                             "score": score, "file": name, "ranked_file": f"ranked/{ranked_name}",
                             "size": [pil.width, pil.height]})

    def finalize(self, t0: float) -> list[int]:
        """The JSON record and the contact sheet of the results so far, best first; returns that order."""
        results = self.results
        self.out_dir.mkdir(parents=True, exist_ok=True)
        order = sorted(range(len(results)), key=lambda j: (results[j]["score"] is None, results[j]["score"] or 0.0, j))
        for rank_, j in enumerate(order, 1):
            results[j]["rank"] = rank_
        self.record["results"] = [results[j] for j in order]
        self.record["elapsed_s"] = round(time.time() - t0, 2)
        write_json(self.json_path, self.record)
        tiles = [(to_pil(self.image[0]), "source"), (mask_overlay(self.image, self.mask), "mask")]
        for j in order:
            r = results[j]
            s = "" if r["score"] is None else f"  {r['score']:.4f}"
            tiles.append((self.pil_results[r["file"]], f"#{r['rank']}{s}  i{r['iteration']} b{r['batch_index']}"))
        contact_sheet(tiles, self.sheet_path, title=f"{self.args.prompt!r}  ({self.algorithm}, seed {self.args.seed})")
        return order

    def report(self) -> int:
        if self.results:
            best = self.results[self.order[0]]
            summary.info("%d result(s) in %s (ranked best first in %s), contact sheet %s, parameters %s",
                         len(self.results), self.out_dir, self.ranked_dir, self.sheet_path, self.json_path)
            summary.info("best: %s%s", self.out_dir / best["ranked_file"],
                         "" if best["score"] is None else f" (D_CLIP {best['score']:.4f})")
        else:
            summary.info("no finished result; parameters in %s", self.json_path)
        return 130 if self.interrupted else 0


def cmd_edit(args) -> int:
    check_inputs(args)
    return EditJob(args).prepare().run().report()
