"""``blended-diffusion bench``: benchmark-scale editing and evaluation (PIE-Bench or a manifest), in this process
or on a Ray cluster. data.py reads datasets, worker.py edits and measures one item with loaded models, runner.py
feeds the items to one local worker or to Ray actors and writes what comes back, report.py summarises,
bootstrap.py makes the pack importable in Ray workers; this module is the subcommand (``add_parser``,
``cmd_bench``: check, select, configure, run, summarise). The metrics are models/metrics.py (shared with
Evaluate Edit and the fidelity curve)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import CLIError
from ..common import (COMFYUI_FIX, add_diffusion_args, add_model_args, add_sd_checkpoint_args,
                      add_parser as new_parser, check_at_least_one,
                      check_skip, check_weights, import_comfyui, log, resolve_device, resolve_weights, summary,
                      write_json)
from .data import METHODS, SD_METHODS

RUN_FILE = "bench.json"


def add_parser(sub) -> argparse.ArgumentParser:
    b = new_parser(
        sub, "bench", help="edit and evaluate a dataset (PIE-Bench or a manifest), locally or on a Ray cluster",
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
    add_diffusion_args(g)
    g.add_argument("--skip_timesteps", type=int, default=25, help="skipped respaced steps (edit's default)")
    g.add_argument("--batch_size", type=int, default=1,
                   help="results per item; with more than one the best by CLIP under the mask is kept and measured")
    g.add_argument("--fast", action="store_true", help="fast guidance (no UNet backward), as `edit --fast`")
    add_model_args(b)
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
    add_sd_checkpoint_args(s)
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


def check_inputs(args) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CLIError(f"--methods {args.methods!r}: use one or more of {', '.join(METHODS)}")
    methods = list(dict.fromkeys(methods))
    check_at_least_one(args, ("batch_size", "aug_num"))
    if args.max_attempts < 1:
        raise CLIError(f"--max-attempts = {args.max_attempts}: it must be at least 1")
    for name, value in (("--limit", args.limit), ("--threads", args.threads), ("--ray-cpus", args.ray_cpus)):
        if value is not None and value < 1:
            raise CLIError(f"{name} = {value}: it must be at least 1")
    if args.ray_cpus is not None and args.ray is None:
        raise CLIError("--ray-cpus belongs to a Ray run: give --ray local (or auto, or an address) too")
    if "blended" in methods:
        check_weights(args, ("clip_guidance_lambda", "range_lambda"))
        check_skip(args.skip_timesteps, args.timestep_respacing)
    sd = [m for m in methods if m in SD_METHODS]
    if sd:
        if args.sd_checkpoint is None:
            raise CLIError(f"--methods {','.join(sd)} edit with Stable Diffusion: give --sd-checkpoint FILE "
                           "(and --comfyui DIR)")
        if not Path(args.sd_checkpoint).expanduser().is_file():
            raise CLIError(f"--sd-checkpoint {args.sd_checkpoint}: file not found")
        if args.steps < 2:
            raise CLIError(f"--steps = {args.steps}: it must be at least 2")
        if args.inner_steps < 0:
            raise CLIError(f"--inner-steps = {args.inner_steps}: it must be >= 0")
        if not 1 <= args.guidance < float("inf"):
            raise CLIError(f"--guidance = {args.guidance}: it must be a finite number >= 1")
        for flag, v in (("--t0", args.t0), ("--cross-replace-steps", args.cross_replace_steps),
                        ("--self-replace-steps", args.self_replace_steps)):
            if not 0 <= v <= 1 or (flag == "--t0" and v == 0):
                raise CLIError(f"{flag} = {v}: it must be in {'(0, 1]' if flag == '--t0' else '[0, 1]'}")
    elif args.sd_checkpoint is not None:
        log.warning("--sd-checkpoint is unused: add p2p, sdedit or sdedit-plain to --methods")
    for flag, value in (("--metric-clip", args.metric_clip), ("--dino", args.dino)):
        if value is not None and not Path(value).expanduser().is_file():
            raise CLIError(f"{flag} {value}: file not found")
    return methods


def select(items: list, args) -> list:
    if args.ids:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        known = {it.id for it in items}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise CLIError(f"--ids: no item {', '.join(map(repr, missing[:5]))} in the dataset")
        items = [it for it in items if it.id in set(wanted)]
    if args.edit_types:
        types = {t.strip() for t in args.edit_types.split(",") if t.strip()}
        items = [it for it in items if it.edit_type in types]
    return items[:args.limit] if args.limit else items


def run_record(out_dir: Path, dataset: str, settings: dict, argv) -> dict:
    """bench.json: what this output folder holds. Settings of a method already in it must not change (its rows
    would mix); another method may be added."""
    path = out_dir / RUN_FILE
    record = {"command": "bench", "dataset": dataset, "settings": {}, "runs": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CLIError(f"{path} is damaged: remove it (the rows in results.jsonl stay) or use another "
                           "--output_path") from None
        if record.get("dataset") != dataset:
            log.warning("%s held a run of %s; now %s", out_dir, record.get("dataset"), dataset)
        for method, new in settings.items():
            old = record.get("settings", {}).get(method)
            if old is not None and old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise CLIError(f"{out_dir} holds {method} results made with other settings ({', '.join(diff)}): "
                               "use the same settings to resume, or another --output_path")
    record["dataset"] = dataset
    record.setdefault("settings", {}).update(settings)
    record.setdefault("runs", []).append({"argv": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return record


def check_comfyui(args, ray_mode: bool) -> None:
    """ComfyUI for the SD methods: imported here (the local run), or its folder checked (Ray workers import it)."""
    if ray_mode:
        path = args.comfyui or os.environ.get("COMFYUI_PATH")
        if not path or not (Path(path).expanduser() / "comfy" / "sd.py").is_file():
            raise CLIError(f"--comfyui {path}: not a ComfyUI installation. {COMFYUI_FIX}")
    else:
        import_comfyui(args.comfyui, resolve_device(args.device, args.gpu_id))


def read_items(args) -> list:
    from . import data
    try:
        items = select(data.load(args.dataset), args)
    except data.DatasetError as e:
        raise CLIError(str(e)) from None
    if not items:
        raise CLIError(f"{args.dataset}: no item to run (check --ids / --edit-types / --limit)")
    return items


def make_config(args, methods: list[str]):
    """The workers' Config (plain values): the weight files by name until ``resolve_files``."""
    from ...models.weights import DEFAULT_WEIGHTS
    from .worker import Config
    key = "ddpm_512" if args.model_output_size == 512 else "ddpm_256"
    sd = {"checkpoint": str(Path(args.sd_checkpoint).expanduser().resolve()) if args.sd_checkpoint else None,
          "comfyui": args.comfyui, "steps": args.steps, "guidance": args.guidance, "inner_steps": args.inner_steps,
          "t0": args.t0, "cross_replace_steps": args.cross_replace_steps,
          "self_replace_steps": args.self_replace_steps}
    blended = {"timestep_respacing": args.timestep_respacing, "skip_timesteps": args.skip_timesteps,
               "ddim": args.ddim, "aug_num": args.aug_num, "clip_guidance_lambda": args.clip_guidance_lambda,
               "range_lambda": args.range_lambda, "batch_size": args.batch_size, "fast": args.fast}
    return Config(methods=methods, clip=args.clip or DEFAULT_WEIGHTS["clip"].name,
                  ddpm=(args.model or DEFAULT_WEIGHTS[key].name) if "blended" in methods else None,
                  metric_clip=str(Path(args.metric_clip).expanduser().resolve()) if args.metric_clip else None,
                  dino=str(Path(args.dino).expanduser().resolve()) if args.dino else None,
                  lpips_net=args.lpips_net, device=args.device, gpu_id=args.gpu_id, precision=args.precision,
                  clip_precision=args.clip_precision, seed=args.seed, blended=blended, sd=sd)


def pending_work(items: list, methods: list[str], out) -> list:
    """(item, methods not finished in ``out``) of every item with something left to run."""
    done = out.finished()
    skipped = sum(1 for it in items for m in methods if (it.id, m) in done)
    if skipped:
        log.info("%d finished (item, method) pair(s) in %s: skipped", skipped, out.path)
    work = [(it, [m for m in methods if (it.id, m) not in done]) for it in items]
    return [(it, ms) for it, ms in work if ms]


def dino_notes(args) -> list[str]:
    if args.dino is not None:
        return []
    note = ("structure_distance is empty: it needs DINO ViT weights (--dino PATH, PIE-Bench uses "
            "dino_vitb8_pretrain.pth)")
    log.warning(note)
    return [note]


def resolve_files(args, config) -> None:
    """The weight files (downloaded if missing, all missing ones named in one error) into the config."""
    ddpm_file, clip_file = resolve_weights(args, need_ddpm=config.ddpm is not None, need_clip=True)
    if ddpm_file is not None:
        config.ddpm = str(ddpm_file)
    config.clip = str(clip_file)


def run_work(args, work: list, config, out) -> tuple[dict | None, bool]:
    """(Ray's counts or None, interrupted): the work on Ray or here, every result written as it arrives."""
    from tqdm.auto import tqdm

    from . import runner
    bar = tqdm(total=len(work), desc="bench", unit="item", file=sys.stderr, dynamic_ncols=True)
    try:
        if args.ray is not None:
            return runner.run_ray(work, config, out, address=args.ray, cpus=args.ray_cpus,
                                  max_attempts=args.max_attempts, progress=bar, verbose=args.verbose,
                                  threads=args.threads), False
        runner.run_local(work, config, out, progress=bar, threads=args.threads)
        return None, False
    except KeyboardInterrupt:
        return None, True
    finally:
        bar.close()


def report_run(out, before: int, notes: list[str], stats: dict | None, seconds: float) -> None:
    from . import report
    rows = out.rows()
    lines = report.write(out.dir, rows, notes)
    errors = sum(1 for r in report.latest(rows) if r.get("error") is not None)
    if stats and stats["worker_deaths"]:
        summary.info("Ray: %d worker death(s), %d item(s) re-run", stats["worker_deaths"], stats["retries"])
    for line in lines:
        if line["edit_type"] == "all":
            summary.info("%-40s %d item(s), %d error(s); CLIP whole %s, background PSNR %s, LPIPS %s",
                         METHODS.get(line["method"], line["method"]), line["items"], line["errors"],
                         report.fmt(line["clip_similarity_target_image"]), report.fmt(line["psnr_unedit_part"]),
                         report.fmt(line["lpips_unedit_part"]))
    summary.info("%s: %d new row(s) in %.1f s, %d (item, method) pair(s) failed; summary %s, %s, %s", out.path,
                 len(rows) - before, seconds, errors, out.dir / "summary.csv", out.dir / "summary.md",
                 out.dir / "summary.png")


def cmd_bench(args) -> int:
    from . import runner
    methods = check_inputs(args)
    if args.ray is not None:
        runner.import_ray()  # before any work: an error line if Ray is missing
    if any(m in SD_METHODS for m in methods):
        check_comfyui(args, args.ray is not None)
    items = read_items(args)
    config = make_config(args, methods)
    out = runner.Output(args.output_path)
    record = run_record(out.dir, str(Path(args.dataset).resolve()), {m: config.settings(m) for m in methods},
                        args.argv)  # before anything is skipped: the finished rows must be this run's kind
    before = len(out.rows())
    work = pending_work(items, methods, out)
    notes = dino_notes(args)
    t0 = time.time()
    stats, interrupted = None, False
    if work:  # the weight files (downloaded if missing) only when there is something to run
        resolve_files(args, config)
        out.dir.mkdir(parents=True, exist_ok=True)
        write_json(out.dir / RUN_FILE, record)
        stats, interrupted = run_work(args, work, config, out)
    report_run(out, before, notes, stats, time.time() - t0)
    if interrupted:
        log.warning("interrupted: the finished rows are kept; run the same command again to resume")
        return 130
    return 0
