"""Throughput of ``blended-diffusion bench``: the local runner against Ray with 1 and 2 CPU workers (one torch
thread each, the local run too) on the same items. Not part of the suite.

    python tests/benchmark_bench.py                       # 12 items, tiny random models, 128 px, 6 steps
    python tests/benchmark_bench.py --items 24 --model 256x256_diffusion_uncond.pt --clip ViT-B-16.pt

Each configuration is one ``bench`` command, run in this process exactly as a user runs it (dataset read,
models loaded, Ray started and stopped), into its own output folder. Per run: the wall time of the command,
the time to its first row, and the steady rate: with W workers, the rows after the first W (each worker's first
includes its warm-up) divided by the time from the W-th row to the last (row times are the driver's "finished"
stamps, taken as it writes each row); edit and metrics seconds are the means over the same rows. Ray's overhead per
item is the steady seconds per item of one Ray worker minus the local runner's; its fixed cost (starting Ray
and the workers, which load the models) is the difference of the times to the first row. "other s/item" is a
worker's time per item beyond its own edit and metrics (workers × steady s/item − edit s − metrics s, the last two
measured inside the worker): what the runner adds per item (moving the job and the result, Ray's scheduling, the
driver writing), independent of how fast the machine ran the edits themselves in that run. The load average of
the machine is printed too: on a machine shared with other work, runs minutes apart see different speeds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("BLENDED_DIFFUSION_LPIPS_RANDOM", "1")  # no torchvision download (random LPIPS backbone)

from pack import load_pack  # noqa: E402

load_pack()


def make_items(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        rng = np.random.default_rng(k)
        yy, xx = np.mgrid[0:size, 0:size]
        arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy + 40 * k) % 256], -1) + rng.integers(0, 20, (size, size, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img_{k}.png")
        m = np.zeros((size, size), np.uint8)
        m[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 255
        Image.fromarray(m).save(folder / f"mask_{k}.png")
        rows.append({"id": f"item{k:03d}", "image": f"img_{k}.png", "mask": f"mask_{k}.png",
                     "prompt": f"a [red] ball number {k}", "edit_type": str(k % 3)})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(name: str, argv: list[str], out: Path, workers: int) -> dict:
    from blended_diffusion import cli
    start = datetime.datetime.now(datetime.timezone.utc)
    t = time.perf_counter()
    rc = cli.main(["-q", "bench", *argv, "--output_path", str(out)])
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"{name}: bench exited with {rc}")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    if any(r["error"] for r in rows):
        raise SystemExit(f"{name}: failed rows: {[r['error'] for r in rows if r['error']][:3]}")
    for r in rows:
        r["t"] = (datetime.datetime.fromisoformat(r["finished"]) - start).total_seconds()
    rows.sort(key=lambda r: r["t"])
    w = workers  # steady state: the rows after each worker's first (which includes its warm-up)
    later = rows[w:]
    steady = (rows[-1]["t"] - rows[w - 1]["t"]) / len(later) if later else float("nan")
    return {"runner": name, "items": len(rows), "wall_s": wall, "first_row_s": rows[0]["t"],
            "s_per_item": steady, "items_per_s": 1 / steady if steady else float("nan"),
            "edit_s": sum(r["seconds"] for r in later) / len(later),
            "metric_s": sum(r["metric_seconds"] for r in later) / len(later), "workers": workers,
            "load": os.getloadavg()[0]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--respacing", default="10")
    p.add_argument("--skip", type=int, default=4, help="skipped steps (10 - 4 = 6 denoising steps)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--model", default=None, help="guided-diffusion checkpoint (default: tests/tiny.py's 64x64 UNet)")
    p.add_argument("--clip", default=None, help="CLIP checkpoint (default: tests/tiny.py's CLIP)")
    p.add_argument("--runners", default="local,ray1,ray2")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)
    if "ray" in args.runners:
        import ray  # noqa: F401  (the [ray] extra)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark_bench_"))
    model, clip = args.model, args.clip
    if model is None or clip is None:
        import tiny
        cfg = {k: v for k, v in tiny.UNET_64_CLASSES.items() if k != "num_classes"}
        model = model or str(tiny.save_unet(work / "64x64_uncond.pt", cfg))
        clip = clip or str(tiny.save_clip(work / "ViT-B-16.pt", "torchscript"))
    manifest = make_items(work / "items", args.items, args.size)
    common = [str(manifest), "--model", model, "--clip", clip, "--timestep_respacing", args.respacing,
              "--skip_timesteps", str(args.skip), "--aug_num", str(args.views), "--device", "cpu", "--threads", "1"]
    runs = {"local": ("local, 1 thread", [], 1),
            "ray1": ("Ray, 1 CPU worker", ["--ray", "local", "--ray-cpus", "1"], 1),
            "ray2": ("Ray, 2 CPU workers", ["--ray", "local", "--ray-cpus", "2"], 2)}
    results = []
    for key in args.runners.split(","):
        name, extra, workers = runs[key]
        results.append(run(name, common + extra, work / f"out_{key}", workers))
    base = next((r for r in results if r["runner"].startswith("local")), None)
    print(f"\n{args.items} items, {args.size}x{args.size}, {int(args.respacing) - args.skip if args.respacing.isdigit() else '?'}"
          f" denoising steps, {args.views} views; models {Path(model).name}, {Path(clip).name}; "
          f"{os.cpu_count()} CPU cores\n")
    print("| runner | wall s | first row s | steady s/item | items/s | × local | edit s | metrics s | other s/item "
          "| load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{r['items_per_s'] / base['items_per_s']:.2f}" if base else ""
        other = r["workers"] * r["s_per_item"] - r["edit_s"] - r["metric_s"]
        print(f"| {r['runner']} | {r['wall_s']:.1f} | {r['first_row_s']:.1f} | {r['s_per_item']:.2f} | "
              f"{r['items_per_s']:.2f} | {speed} | {r['edit_s']:.2f} | {r['metric_s']:.2f} | {other:+.2f} | "
              f"{r['load']:.1f} |")
    ray1 = next((r for r in results if r["runner"].startswith("Ray, 1")), None)
    if base and ray1:
        print(f"\nRay's overhead per item (1 worker vs local, steady): {ray1['s_per_item'] - base['s_per_item']:+.3f} s; "
              f"fixed cost (start Ray and the worker, load its models): "
              f"{ray1['first_row_s'] - base['first_row_s']:+.1f} s before the first row")
    return results


if __name__ == "__main__":
    main()
