"""``fidelity``: the supplement's fidelity/editability curve (models/fidelity.py, shared with the FidelityCurve
node): Blended Diffusion over --skip-timesteps and, with --sd-checkpoint, SDEdit over --t0 after NULL-text
inversion and plain (Stable Diffusion through the host adapter, host/sd.py); with --compare-methods, instead, each
inversion method on -i (models/compare.py, as the CompareInversionMethods node: ``cmd_compare``). Steps: ``check_inputs``,
``prepare`` (ComfyUI, source, mask, models, record), ``sweep_runs`` (the list of runs), ``measure`` (make and
score each, Ctrl-C keeps the finished ones), ``write_outputs``."""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..render import figure, label, to_pil
from . import CLIError
from .common import (StepBar, add_context_arg, add_diffusion_args, add_model_args, add_sd_checkpoint_args,
                     add_parser as new_parser,
                     check_at_least_one, check_context, check_output_dir, check_weights, count_steps, engine_check,
                     import_comfyui, load_models, log, parameters, resolve_device, resolved_path, summary,
                     use_example, vae_crop, write_json)
from .images import checked_mask, load_image

METHODS = ("null-text", "null-text global", "negative-prompt", "direct")  # models/inversion.py's, without torch


def add_parser(sub):
    f = new_parser(sub, "fidelity", help="fidelity/editability curve: LPIPS to the source vs CLIP distance to the "
                                         "prompt over a sweep (plot + CSV)",
                   description="The supplement's fidelity/editability measurement: each result's LPIPS to the "
                               "source (whole image) against its CLIP distance to the prompt (inside the mask; "
                               "the whole image without one). With --mask: Blended Diffusion over "
                               "--skip-timesteps. With --sd-checkpoint: SDEdit over --t0 after NULL-text "
                               "inversion and plain (needs ComfyUI to load the checkpoint). Both give one plot. "
                               "Writes <output_path>/fidelity.png, fidelity.csv (method, parameter, value, "
                               "lpips, clip_distance) and fidelity.json. Without -i/--mask/--sd-checkpoint, "
                               "sweeps the bundled example. With --compare-methods (and --sd-checkpoint, -i, "
                               "--source-prompt): compares the inversion methods' reconstructions of -i instead "
                               "(compare.csv, compare.png, compare.json).")
    f.add_argument("-p", "--prompt", type=str, default=None,
                   help="the target prompt: the edits go towards it and every result is scored against it")
    f.add_argument("-i", "--init_image", type=str, default=None, help="the source image")
    f.add_argument("--mask", type=str, default=None,
                   help="mask image (read as for edit): the region Blended Diffusion edits and the CLIP distance "
                        "is measured in")
    f.add_argument("--invert_mask", action="store_true", help="use the outside of the mask instead")
    add_context_arg(f)
    f.add_argument("--skip-timesteps", "--skip_timesteps", dest="skip_timesteps", default="20,40,60,80",
                   metavar="N,N,...", help="Blended Diffusion sweep: skipped steps of the respaced schedule "
                                           "(more = closer to the source; default 20,40,60,80)")
    add_diffusion_args(f)
    _add_sd_args(f)
    f.add_argument("--save-images", "--save_images", dest="save_images", action="store_true",
                   help="also save every result to <output_path>/fidelity_images/")
    f.add_argument("--output_path", type=str, default="output", help="output folder")
    add_model_args(f)
    return f


def _add_sd_args(f):
    g = f.add_argument_group("SDEdit with and without NULL-text inversion (Stable Diffusion 1.x/2.x/SDXL via ComfyUI)")
    add_sd_checkpoint_args(g)
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
    g.add_argument("--method", default="null-text", choices=METHODS, metavar="METHOD",
                   help="the inversion method of -i: " + ", ".join(METHODS) + " (default null-text; quote the "
                        "one with a space)")
    g.add_argument("--global-null", dest="global_null", action="store_true",
                   help="NULL-text with one null embedding for all steps (= --method 'null-text global')")
    g.add_argument("--compare-methods", dest="compare_methods", metavar="M,M,...", default=None,
                   help="instead of the sweep, invert -i with each of these methods (comma separated, e.g. "
                        "'null-text, negative-prompt, direct') and write <output_path>/compare.csv, compare.png "
                        "and compare.json: reconstruction LPIPS/PSNR, seconds and eps calls per method (-p, "
                        "--mask and --t0 unused); Ctrl-C keeps the finished rows")
    g.add_argument("--t0", default="0.2,0.4,0.6,0.8,1.0", metavar="T,T,...",
                   help="SDEdit strengths to sweep, fractions of the DDIM steps in (0, 1] (default "
                        "0.2,0.4,0.6,0.8,1.0)")
    g.add_argument("--no-plain-sdedit", dest="plain_sdedit", action="store_false",
                   help="only SDEdit after NULL-text inversion (no plain SDEdit from random noise)")


@dataclass
class Plan:
    """What ``check_inputs`` settled: the prompt, the sweeps and the files."""
    prompt: str
    skips: list[int] = field(default_factory=list)
    t0s: list[float] = field(default_factory=list)
    ckpt: Path | None = None
    inv_file: Path | None = None

    @property
    def sd_mode(self) -> bool:
        return self.ckpt is not None


# --- check_inputs -------------------------------------------------------------------------------
def _check_blended_only(args) -> None:
    """Without --sd-checkpoint: no SD flag, and an image with its mask (the bundled example without both)."""
    for flag, value in (("--inversion", args.inversion), ("--source-prompt", args.source_prompt),
                        ("--save-inversion", args.save_inversion)):
        if value is not None:
            raise CLIError(f"{flag} belongs to the SDEdit sweep: give --sd-checkpoint FILE too")
    if args.init_image is None and args.mask is None:
        use_example(args, "sweeping")
    if args.init_image is None:
        raise CLIError("--mask given without -i/--init_image: give the image the mask belongs to")
    if args.mask is None:
        raise CLIError("the Blended Diffusion sweep needs --mask MASK (the region to edit and score); for the "
                       "SDEdit sweep give --sd-checkpoint FILE")


def _check_sd(args, plan: Plan) -> None:
    """The SDEdit sweep's flags: the checkpoint, -i with its caption or a saved inversion, the numbers."""
    from ..models import fidelity as fid
    plan.ckpt = Path(args.sd_checkpoint).expanduser()
    if not plan.ckpt.is_file():
        raise CLIError(f"--sd-checkpoint {args.sd_checkpoint}: file not found")
    if args.inversion is not None:
        plan.inv_file = Path(args.inversion).expanduser()
        if not plan.inv_file.is_file():
            raise CLIError(f"--inversion {args.inversion}: file not found (save one with --save-inversion or "
                           "ComfyUI's Save Inversion)")
        if args.init_image is not None:
            log.warning("-i %s ignored: the inversion %s holds its own source image", args.init_image, plan.inv_file)
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
    if args.global_null and args.method not in ("null-text", "null-text global"):
        raise CLIError(f"--global-null applies to NULL-text only, not to --method {args.method!r}: drop one")
    if args.global_null:
        args.method = "null-text global"
    if plan.inv_file is not None and (args.method != "null-text" or args.global_null):
        log.warning("--method ignored: the inversion %s was made with its own method", plan.inv_file)
    if args.guidance is not None and not 1 <= args.guidance < float("inf"):
        raise CLIError(f"--guidance = {args.guidance}: it must be a finite number >= 1")
    plan.t0s = engine_check(fid.parse_values, args.t0, "--t0", 1e-6, 1.0)


def check_inputs(args) -> Plan:
    """Every flag, before any model is loaded; nothing is written."""
    from ..models import fidelity as fid
    if args.sd_checkpoint is None:
        _check_blended_only(args)
    if args.prompt is None or not args.prompt.strip():
        raise CLIError("-p/--prompt is required: the target prompt every result is scored against")
    plan = Plan(prompt=args.prompt.strip())
    check_at_least_one(args, ("aug_num",))
    check_weights(args, ("clip_guidance_lambda", "range_lambda"))
    check_context(args.context)
    if args.mask is not None:
        n = count_steps(args.timestep_respacing)
        plan.skips = [int(v) for v in engine_check(fid.parse_values, args.skip_timesteps, "--skip-timesteps", 0, n - 1)]
    if args.sd_checkpoint is not None:
        _check_sd(args, plan)
    check_output_dir(args.output_path)
    if args.save_inversion:
        check_output_dir(Path(args.save_inversion).expanduser().parent, "--save-inversion")
    return plan


# --- prepare ------------------------------------------------------------------------------------
def _record(args, plan: Plan, image, models) -> dict:
    return {"command": "fidelity", "argv": args.argv, "parameters": parameters(args),
            "resolved": {"init_image": resolved_path(args.init_image) if image is not None else None,
                         "mask": resolved_path(args.mask), "model": str(models.ddpm_file) if models.ddpm_file else None,
                         "clip": str(models.clip_file), "device": str(models.device), "precision": models.precision,
                         "prompt": plan.prompt, "sd_checkpoint": str(plan.ckpt.resolve()) if plan.ckpt else None,
                         "lpips": "to the source, whole image",
                         "clip_distance": "D_CLIP to the prompt inside the mask" if args.mask else
                                          "D_CLIP to the prompt, whole image"},
            "rows": [], "interrupted": False}


def prepare(args, plan: Plan):
    """(source image or None, mask or None, the loaded models, the record); ComfyUI first, so that a missing one
    fails before any model is loaded."""
    if plan.sd_mode:
        import_comfyui(args.comfyui, resolve_device(args.device, args.gpu_id))
    image = load_image(args.init_image) if args.init_image is not None and plan.inv_file is None else None
    mask = None
    if args.mask is not None and image is not None:
        mask = checked_mask(args.mask, tuple(image.shape[-2:]), args.invert_mask)
    models = load_models(args, need_ddpm=bool(plan.skips), need_clip=True, respacing=args.timestep_respacing)
    return image, mask, models, _record(args, plan, image, models)


# --- the runs -----------------------------------------------------------------------------------
def _inversion(args, plan: Plan, sd_models, image, mask, record: dict):
    """(the inversion, its guidance, the mask at its source's size): loaded from --inversion, or NULL-text
    inversion of -i through the host adapter (saved with --save-inversion)."""
    from ..host import sd as host_sd
    from ..models import inversion as ni
    model, sd_clip, vae = sd_models
    if plan.inv_file is not None:
        inv = ni.Inversion.from_file(plan.inv_file)
        guidance = inv.guidance if args.guidance is None else args.guidance
        inv.check_guidance(guidance)
        if args.mask is not None:
            mask = checked_mask(args.mask, tuple(inv.source.shape[1:3]), args.invert_mask)
        return inv, guidance, mask
    guidance = 7.5 if args.guidance is None else args.guidance
    image, mask = vae_crop(vae, image, mask)  # the mask cropped as the VAE crops the image
    steps = args.steps or 50
    sd = host_sd.SDModel(model, grad=args.inner_steps > 0 and args.method in ni.OPTIMISING)
    bar = StepBar(ni.invert_steps(steps, args.inner_steps, method=args.method), f"{args.method} inversion")
    try:
        inv, _ = host_sd.invert_image(sd, sd_clip, vae, image.movedim(1, -1), args.source_prompt.strip(),
                                      steps=steps, guidance=guidance, inner_steps=args.inner_steps,
                                      method=args.method, callback=bar)
    finally:
        bar.close()
    record["inversion_report"] = inv.report()
    if args.save_inversion:
        inv.to_file(Path(args.save_inversion).expanduser())
        log.info("saved the inversion to %s", args.save_inversion)
    return inv, guidance, mask


def sdedit_sweep(args, plan: Plan, image, mask, record: dict):
    """The SDEdit half: load the checkpoint with ComfyUI, invert -i (or load --inversion), and list the runs.
    Returns (runs, the inversion's source [1, 3, H, W], the mask at its size)."""
    from ..host import sd as host_sd
    from ..models import inversion as ni
    log.info("loading %s with ComfyUI", plan.ckpt)
    try:
        sd_models = host_sd.load_checkpoint(plan.ckpt)
    except ValueError as e:
        raise CLIError(f"--sd-checkpoint {e}") from None
    inv, guidance, mask = _inversion(args, plan, sd_models, image, mask, record)
    model, sd_clip, vae = sd_models
    source = inv.source.movedim(-1, 1).float()
    record["resolved"].update({"source_prompt": inv.prompt, "steps": inv.steps, "guidance": guidance,
                               "inversion": str(plan.inv_file.resolve()) if plan.inv_file else None,
                               "source_size": [source.shape[-1], source.shape[-2]]})
    sd = host_sd.SDModel(model)
    cond = sd.condition(sd_clip, plan.prompt, inv.latents[0])
    runs = ni.sdedit_runs(sd, inv, cond, plan.t0s, guidance, args.seed, lambda z: sd.decode_pixels(vae, z),
                          args.plain_sdedit)
    return runs, source, mask


def blended_sweep(args, plan: Plan, models, source, mask) -> list:
    from ..models import AugmentSettings, Guide
    from ..models import fidelity as fid
    guide = Guide(clip=models.clip, prompt=plan.prompt, clip_lambda=args.clip_guidance_lambda,
                  range_lambda=args.range_lambda, augment=AugmentSettings(num_views=args.aug_num))
    return fid.blended_runs(models.ddpm, guide, source, mask, plan.skips, seed=args.seed, ddim=args.ddim,
                            context=args.context)


def measure(runs: list, source, clip, prompt: str, mask, record: dict) -> tuple[list, list]:
    """(rows, images) of the runs made and measured in order; Ctrl-C keeps the finished ones."""
    from tqdm.auto import tqdm

    from ..models import fidelity as fid
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
    return rows, images


# --- outputs ------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "_", text.lower()).strip("_")


def write_outputs(args, plan: Plan, rows: list, images: list, record: dict, t_start: float) -> tuple[Path, ...]:
    """fidelity.json always; fidelity.csv and fidelity.png when a row finished (else removed, so no curve of an
    earlier run passes for this one's); with --save-images every result."""
    from ..models import fidelity as fid
    out_dir = Path(args.output_path).expanduser()
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
        figure(rows, plan.prompt).save(png_path)
    else:
        csv_path.unlink(missing_ok=True)
        png_path.unlink(missing_ok=True)
    record["elapsed_s"] = round(time.time() - t_start, 2)
    write_json(json_path, record)
    return json_path, png_path, csv_path


def report(rows: list, n_runs: int, record: dict, paths: tuple[Path, ...]) -> int:
    json_path, png_path, csv_path = paths
    for row in rows:
        summary.info("%-34s %s: LPIPS %.4f, D_CLIP %.4f", row.method, label(row.parameter, row.value),
                     row.lpips, row.clip_distance)
    if record["interrupted"]:
        log.warning("interrupted: kept the %d finished result(s) of %d", len(rows), n_runs)
    if rows:
        summary.info("fidelity curve of %d result(s): plot %s, CSV %s (parameters %s)", len(rows), png_path,
                     csv_path, json_path)
    else:
        summary.info("no finished result; parameters in %s", json_path)
    return 130 if record["interrupted"] else 0


# --- --compare-methods ----------------------------------------------------------------------------
def check_compare(args) -> tuple[Plan, list[str]]:
    """The method comparison's flags: the checkpoint, -i with its caption, the methods and numbers."""
    from ..models import compare as cmp
    if args.sd_checkpoint is None:
        raise CLIError("--compare-methods needs --sd-checkpoint FILE: the Stable Diffusion model every method "
                       "inverts with")
    if args.inversion is not None or args.save_inversion is not None:
        raise CLIError("--compare-methods inverts -i with each method itself: drop --inversion / --save-inversion")
    methods = engine_check(cmp.parse_methods, args.compare_methods)
    plan = Plan(prompt=(args.prompt or "").strip())
    _check_sd(args, plan)
    for flag, value in (("-p/--prompt", args.prompt), ("--mask", args.mask),
                        ("--method/--global-null", None if args.method == "null-text" else args.method)):
        if value is not None:
            log.warning("%s ignored: --compare-methods measures reconstructions of -i", flag)
    check_output_dir(args.output_path)
    return plan, methods


def _finite(v):
    """A number for the JSON record: an infinite PSNR (an identical image) as None (JSON has no infinity)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def cmd_compare(args) -> int:
    """Each inversion method on -i (models/compare.py, as the CompareInversionMethods node): compare.csv,
    compare.png (the table), compare.json, with --save-images the reconstructions."""
    import torch

    from ..host import sd as host_sd
    from ..models import compare as cmp
    from ..models import inversion as ni
    from ..render import table
    plan, methods = check_compare(args)
    import_comfyui(args.comfyui, resolve_device(args.device, args.gpu_id))
    image = load_image(args.init_image)
    t_start = time.time()
    steps, guidance = args.steps or 50, 7.5 if args.guidance is None else args.guidance
    prompt = args.source_prompt.strip()
    log.info("loading %s with ComfyUI", plan.ckpt)
    with torch.inference_mode():  # ComfyUI's own mode for its models
        try:
            model, sd_clip, vae = host_sd.load_checkpoint(plan.ckpt)
        except ValueError as e:
            raise CLIError(f"--sd-checkpoint {e}") from None
        image, _ = vae_crop(vae, image)
        sd = host_sd.SDModel(model, grad=args.inner_steps > 0 and any(m in ni.OPTIMISING for m in methods))
        z0, source, cond, uncond, encode_s = host_sd.prepare_inversion(sd, sd_clip, vae, image.movedim(1, -1), prompt,
                                                                        optimise=sd.grad)
        bar = StepBar(cmp.total_steps(methods, steps, args.inner_steps), "inversion methods")
        rows, images, interrupted = [], [source.movedim(-1, 1).float().cpu()], False
        try:
            for row, img in cmp.measure(sd, z0, cond, uncond, source=images[0], methods=methods,
                                        decode=lambda z: sd.decode_pixels(vae, z), prompt=prompt, steps=steps,
                                        guidance=guidance, inner_steps=args.inner_steps, encode_seconds=encode_s,
                                        callback=bar):
                rows.append(row)
                images.append(img)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    out_dir = Path(args.output_path).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, json_path = (out_dir / f"compare.{ext}" for ext in ("csv", "png", "json"))
    if rows:  # Ctrl-C keeps the finished rows; none: no table of an earlier run passes for this one's
        csv_path.write_text(cmp.csv_text(rows))
        table(rows, f"Inversion methods, {steps} steps, guidance {guidance:g}: {prompt[:60]!r}",
              images[1:]).save(png_path)
    else:
        csv_path.unlink(missing_ok=True)
        png_path.unlink(missing_ok=True)
    files = []
    if args.save_images:
        (out_dir / "compare_images").mkdir(exist_ok=True)
        for k, (name, img) in enumerate(zip(["source", *(r.method for r in rows)], images)):
            files.append(f"compare_images/{k:02d}_{_slug(name)}.png")
            to_pil(img[0]).save(out_dir / files[-1])
    write_json(json_path, {"command": "fidelity --compare-methods", "argv": args.argv, "parameters": parameters(args),
                           "resolved": {"init_image": resolved_path(args.init_image),
                                        "sd_checkpoint": str(plan.ckpt.resolve()), "source_prompt": prompt,
                                        "methods": methods, "steps": steps, "guidance": guidance,
                                        "source_size": [source.shape[-2], source.shape[-3]]},
                           "rows": [dict(zip(cmp.HEADER, (r.method, *(_finite(v) for v in (
                                        r.lpips, r.psnr_db, r.seconds, r.eps_calls, r.eps_evaluations, r.latent_mse,
                                        r.psnr_vae_db))))) for r in rows], "images": files, "interrupted": interrupted,
                           "elapsed_s": round(time.time() - t_start, 2)})
    for r in rows:
        summary.info("%-17s LPIPS %.4f, PSNR %.2f dB (%.2f dB to the VAE's), latent MSE %.3g, %.1f s, %d eps calls",
                     r.method, r.lpips, r.psnr_db, r.psnr_vae_db, r.latent_mse, r.seconds, r.eps_calls)
    if interrupted:
        log.warning("interrupted: kept the %d finished row(s) of %d", len(rows), len(methods) + 1)
    if rows:
        summary.info("method comparison: table %s, CSV %s (parameters %s)", png_path, csv_path, json_path)
    return 130 if interrupted else 0


def cmd_fidelity(args) -> int:
    import torch
    if args.compare_methods is not None:
        return cmd_compare(args)
    plan = check_inputs(args)
    image, mask, models, record = prepare(args, plan)
    t_start = time.time()
    runs, source = [], image
    # ComfyUI's own mode for its models
    with torch.inference_mode() if plan.sd_mode else contextlib.nullcontext():
        if plan.sd_mode:
            runs, source, mask = sdedit_sweep(args, plan, image, mask, record)
        if plan.skips:
            runs += blended_sweep(args, plan, models, source, mask)
        rows, images = measure(runs, source, models.clip, plan.prompt, mask, record)
    paths = write_outputs(args, plan, rows, images, record, t_start)
    return report(rows, len(runs), record, paths)
