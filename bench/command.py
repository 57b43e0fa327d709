"""The ``bench`` subcommand: parser and command (registered by cli.py)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import data, report, runner
from .worker import METHODS, SD_METHODS, Config

log = logging.getLogger("blended_diffusion.cli")
summary = logging.getLogger("blended_diffusion.cli.summary")
RUN_FILE = "bench.json"


def add_parser(sub) -> argparse.ArgumentParser:
    from .. import cli
    b = sub.add_parser(
        "bench", help="edit and evaluate a dataset (PIE-Bench or a manifest), locally or on a Ray cluster",
        description="Benchmark-scale editing and evaluation. DATASET is PIE-Bench's data/ folder (mapping_file.json "
                    "+ annotation_images/) or a .jsonl/.csv manifest (image, mask, prompt, source_prompt, id). Each "
                    "finished (item, method) is written at once (its image and a row in results.jsonl); re-running "
                    "the same command skips those and retries failed ones. Metrics as PIE-Bench defines them.")
    b.add_argument("dataset", help="PIE-Bench data/ folder (or its mapping_file.json), or a .jsonl/.csv manifest")
    b.add_argument("--methods", default="blended",
                   help=f"comma-separated: {', '.join(METHODS)} (all but blended need --sd-checkpoint)")
    b.add_argument("--output_path", "--output-path", dest="output_path", default="bench_output",
                   help="output folder (results.jsonl, images/, summary.*); re-running resumes it")
    b.add_argument("--ids", default=None, help="only these item ids (comma-separated)")
    b.add_argument("--edit-types", "--edit_types", dest="edit_types", default=None,
                   help="only these edit types (PIE-Bench editing_type_id, comma-separated, e.g. 1,2)")
    b.add_argument("--limit", type=int, default=None, help="only the first N items (after the filters)")
    g = b.add_argument_group("Blended Diffusion (as `edit`)")
    cli._add_diffusion_args(g)
    g.add_argument("--skip_timesteps", type=int, default=25, help="skipped respaced steps (edit's default)")
    g.add_argument("--batch_size", type=int, default=1,
                   help="results per item; with more than one the best by CLIP under the mask is kept and measured")
    g.add_argument("--fast", action="store_true", help="fast guidance (no UNet backward), as `edit --fast`")
    cli._add_model_args(b)
    m = b.add_argument_group("metrics")
    m.add_argument("--metric-clip", dest="metric_clip", metavar="PATH", default=None,
                   help="OpenAI-format CLIP for the CLIP similarities (PIE-Bench uses ViT-L/14, e.g. ViT-L-14.pt); "
                        "default: --clip")
    m.add_argument("--dino", metavar="PATH", default=None,
                   help="DINO ViT weights for the structure distance (PIE-Bench: dino_vitb8_pretrain.pth); "
                        "without it that column stays empty")
    m.add_argument("--lpips-net", dest="lpips_net", default="squeeze", choices=["squeeze", "alex", "vgg"],
                   help="LPIPS network of the background LPIPS (PIE-Bench: squeeze)")
    s = b.add_argument_group("NULL-text inversion, prompt-to-prompt and SDEdit (Stable Diffusion 1.x/2.x via ComfyUI)")
    s.add_argument("--sd-checkpoint", dest="sd_checkpoint", metavar="FILE", default=None,
                   help="Stable Diffusion checkpoint, loaded with ComfyUI")
    s.add_argument("--comfyui", metavar="DIR", default=None, help="ComfyUI installation (default: $COMFYUI_PATH)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps of inversion and editing")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--inner-steps", dest="inner_steps", type=int, default=10, help="Adam steps per DDIM step")
    s.add_argument("--t0", type=float, default=0.6, help="SDEdit strength (fraction of the steps re-run)")
    s.add_argument("--cross-replace-steps", dest="cross_replace_steps", type=float, default=0.4,
                   help="prompt-to-prompt cross-attention injection (PIE-Bench's runs: 0.4)")
    s.add_argument("--self-replace-steps", dest="self_replace_steps", type=float, default=0.6,
                   help="prompt-to-prompt self-attention injection (PIE-Bench's runs: 0.6)")
    r = b.add_argument_group("scale-out (Ray)")
    r.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray: auto (a running cluster), local (a new one here) or the cluster's address; "
                        "one worker per GPU unless --ray-cpus")
    r.add_argument("--ray-cpus", dest="ray_cpus", type=int, default=None,
                   help="N CPU workers (one thread each) instead of one per GPU")
    r.add_argument("--max-attempts", dest="max_attempts", type=int, default=3,
                   help="runs of an item whose worker process dies before it is recorded as failed")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads of each worker: the local run or each Ray worker (default: torch's; 1 for "
                        "--ray-cpus workers)")
    return b


def _check(args, cli) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise cli.CLIError(f"--methods {args.methods!r}: use one or more of {', '.join(METHODS)}")
    methods = list(dict.fromkeys(methods))
    for flag, name in (("--batch_size", "batch_size"), ("--aug_num", "aug_num"), ("--max-attempts", "max_attempts")):
        if getattr(args, name) < 1:
            raise cli.CLIError(f"{flag} = {getattr(args, name)}: it must be at least 1")
    for name, value in (("--limit", args.limit), ("--threads", args.threads), ("--ray-cpus", args.ray_cpus)):
        if value is not None and value < 1:
            raise cli.CLIError(f"{name} = {value}: it must be at least 1")
    if args.ray_cpus is not None and args.ray is None:
        raise cli.CLIError("--ray-cpus belongs to a Ray run: give --ray local (or auto, or an address) too")
    if "blended" in methods:
        cli.check_weights(args, ("clip_guidance_lambda", "range_lambda"))
        steps = cli.count_steps(args.timestep_respacing)
        if not 0 <= args.skip_timesteps < steps:
            raise cli.CLIError(f"--skip_timesteps {args.skip_timesteps} with --timestep_respacing "
                               f"{args.timestep_respacing} ({steps} steps): use 0 to {steps - 1}")
    sd = [m for m in methods if m in SD_METHODS]
    if sd:
        if args.sd_checkpoint is None:
            raise cli.CLIError(f"--methods {','.join(sd)} edit with Stable Diffusion: give --sd-checkpoint FILE "
                               "(and --comfyui DIR)")
        if not Path(args.sd_checkpoint).expanduser().is_file():
            raise cli.CLIError(f"--sd-checkpoint {args.sd_checkpoint}: file not found")
        if args.steps < 2:
            raise cli.CLIError(f"--steps = {args.steps}: it must be at least 2")
        if args.inner_steps < 0:
            raise cli.CLIError(f"--inner-steps = {args.inner_steps}: it must be >= 0")
        if not 1 <= args.guidance < float("inf"):
            raise cli.CLIError(f"--guidance = {args.guidance}: it must be a finite number >= 1")
        for flag, v in (("--t0", args.t0), ("--cross-replace-steps", args.cross_replace_steps),
                        ("--self-replace-steps", args.self_replace_steps)):
            if not 0 <= v <= 1 or (flag == "--t0" and v == 0):
                raise cli.CLIError(f"{flag} = {v}: it must be in {'(0, 1]' if flag == '--t0' else '[0, 1]'}")
    elif args.sd_checkpoint is not None:
        log.warning("--sd-checkpoint is unused: add p2p, sdedit or sdedit-plain to --methods")
    for flag, value in (("--metric-clip", args.metric_clip), ("--dino", args.dino)):
        if value is not None and not Path(value).expanduser().is_file():
            raise cli.CLIError(f"{flag} {value}: file not found")
    return methods


def _select(items: list[data.Item], args, cli) -> list[data.Item]:
    if args.ids:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        known = {it.id for it in items}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise cli.CLIError(f"--ids: no item {', '.join(map(repr, missing[:5]))} in the dataset")
        items = [it for it in items if it.id in set(wanted)]
    if args.edit_types:
        types = {t.strip() for t in args.edit_types.split(",") if t.strip()}
        items = [it for it in items if it.edit_type in types]
    return items[:args.limit] if args.limit else items


def _run_record(out_dir: Path, dataset: str, settings: dict, argv, cli) -> dict:
    """bench.json: what this output folder holds. Settings of a method already in it must not change (its rows
    would mix); another method may be added."""
    path = out_dir / RUN_FILE
    record = {"command": "bench", "dataset": dataset, "settings": {}, "runs": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise cli.CLIError(f"{path} is damaged: remove it (the rows in results.jsonl stay) or use another "
                               "--output_path") from None
        if record.get("dataset") != dataset:
            log.warning("%s held a run of %s; now %s", out_dir, record.get("dataset"), dataset)
        for method, new in settings.items():
            old = record.get("settings", {}).get(method)
            if old is not None and old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise cli.CLIError(f"{out_dir} holds {method} results made with other settings ({', '.join(diff)}): "
                                   "use the same settings to resume, or another --output_path")
    record["dataset"] = dataset
    record.setdefault("settings", {}).update(settings)
    record.setdefault("runs", []).append({"argv": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return record


def cmd_bench(args) -> int:
    from .. import cli
    methods = _check(args, cli)
    ray_mode = args.ray is not None
    if ray_mode:
        runner.import_ray()  # before any work: an error line if Ray is missing
    device = None
    if not ray_mode:
        device = cli.resolve_device(args.device, args.gpu_id)
    sd = {"checkpoint": str(Path(args.sd_checkpoint).expanduser().resolve()) if args.sd_checkpoint else None,
          "comfyui": args.comfyui, "steps": args.steps, "guidance": args.guidance, "inner_steps": args.inner_steps,
          "t0": args.t0, "cross_replace_steps": args.cross_replace_steps,
          "self_replace_steps": args.self_replace_steps}
    if any(m in SD_METHODS for m in methods):
        if ray_mode:  # the workers import it; check the folder here
            path = args.comfyui or os.environ.get("COMFYUI_PATH")
            if not path or not (Path(path).expanduser() / "comfy" / "sd.py").is_file():
                raise cli.CLIError(f"--comfyui {path}: not a ComfyUI installation. {cli.COMFYUI_FIX}")
        else:
            cli.import_comfyui(args.comfyui, device)
    try:
        items = _select(data.load(args.dataset), args, cli)
    except data.DatasetError as e:
        raise cli.CLIError(str(e)) from None
    if not items:
        raise cli.CLIError(f"{args.dataset}: no item to run (check --ids / --edit-types / --limit)")
    from ..models.weights import DEFAULT_WEIGHTS
    key = "ddpm_512" if args.model_output_size == 512 else "ddpm_256"
    blended = {"timestep_respacing": args.timestep_respacing, "skip_timesteps": args.skip_timesteps,
               "ddim": args.ddim, "aug_num": args.aug_num, "clip_guidance_lambda": args.clip_guidance_lambda,
               "range_lambda": args.range_lambda, "batch_size": args.batch_size, "fast": args.fast}
    config = Config(methods=methods, clip=args.clip or DEFAULT_WEIGHTS["clip"].name,
                    ddpm=(args.model or DEFAULT_WEIGHTS[key].name) if "blended" in methods else None,
                    metric_clip=str(Path(args.metric_clip).expanduser().resolve()) if args.metric_clip else None,
                    dino=str(Path(args.dino).expanduser().resolve()) if args.dino else None,
                    lpips_net=args.lpips_net, device=args.device, gpu_id=args.gpu_id, precision=args.precision,
                    clip_precision=args.clip_precision, seed=args.seed, blended=blended, sd=sd)
    out = runner.Output(args.output_path)
    record = _run_record(out.dir, str(Path(args.dataset).resolve()), {m: config.settings(m) for m in methods},
                         args.argv, cli)  # before anything is skipped: the finished rows must be this run's kind
    before = len(out.rows())
    done = out.finished()
    work = [(it, [m for m in methods if (it.id, m) not in done]) for it in items]
    work = [(it, ms) for it, ms in work if ms]
    skipped = sum(1 for it in items for m in methods if (it.id, m) in done)
    if skipped:
        log.info("%d finished (item, method) pair(s) in %s: skipped", skipped, out.path)
    notes = []
    if args.dino is None:
        note = ("structure_distance is empty: it needs DINO ViT weights (--dino PATH, PIE-Bench uses "
                "dino_vitb8_pretrain.pth)")
        log.warning(note)
        notes.append(note)
    if work:  # the weight files (downloaded if missing) only when there is something to run
        ddpm_file, clip_file = cli.resolve_weights(args, need_ddpm=config.ddpm is not None, need_clip=True)
        if config.ddpm is not None:
            config.ddpm = str(ddpm_file)
        config.clip = str(clip_file)
        out.dir.mkdir(parents=True, exist_ok=True)
        cli.write_json(out.dir / RUN_FILE, record)
    t0 = time.time()
    interrupted = False
    stats = None
    if work:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(work), desc="bench", unit="item", file=sys.stderr, dynamic_ncols=True)
        try:
            if ray_mode:
                stats = runner.run_ray(work, config, out, address=args.ray, cpus=args.ray_cpus,
                                       max_attempts=args.max_attempts, progress=bar, verbose=args.verbose,
                                       threads=args.threads)
            else:
                runner.run_local(work, config, out, progress=bar, threads=args.threads)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    rows = out.rows()
    lines = report.write(out.dir, rows, notes)
    new = len(rows) - before
    errors = sum(1 for r in report.latest(rows) if r.get("error") is not None)
    if stats and stats["worker_deaths"]:
        summary.info("Ray: %d worker death(s), %d item(s) re-run", stats["worker_deaths"], stats["retries"])
    for line in lines:
        if line["edit_type"] == "all":
            summary.info("%-40s %d item(s), %d error(s); CLIP whole %s, background PSNR %s, LPIPS %s",
                         METHODS.get(line["method"], line["method"]), line["items"], line["errors"],
                         report._fmt(line["clip_similarity_target_image"]), report._fmt(line["psnr_unedit_part"]),
                         report._fmt(line["lpips_unedit_part"]))
    summary.info("%s: %d new row(s) in %.1f s, %d (item, method) pair(s) failed; summary %s, %s, %s", out.path, new,
                 time.time() - t0, errors, out.dir / "summary.csv", out.dir / "summary.md", out.dir / "summary.png")
    if interrupted:
        log.warning("interrupted: the finished rows are kept; run the same command again to resume")
        return 130
    return 0
