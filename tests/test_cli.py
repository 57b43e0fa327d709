"""The command line: official flags and defaults, and every subcommand end to end on tiny checkpoints."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from blended_diffusion import cli
from blended_diffusion.render import PLOT_SIZE

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--timestep_respacing", "10", "--skip_timesteps", "8", "--aug_num", "2"]  # 2 steps
ONE_STEP = ["--timestep_respacing", "10", "--skip_timesteps", "9", "--aug_num", "2"]

# (flag, attribute, official default) for every flag of the official main.py
OFFICIAL_DEFAULTS = [
    ("--skip_timesteps", "skip_timesteps", 25), ("--timestep_respacing", "timestep_respacing", "100"),
    ("--model_output_size", "model_output_size", 256), ("--ddim", "ddim", False),
    ("--local_clip_guided_diffusion", "local_clip_guided_diffusion", False),
    ("--clip_guidance_lambda", "clip_guidance_lambda", 1000), ("--range_lambda", "range_lambda", 50),
    ("--lpips_sim_lambda", "lpips_sim_lambda", 1000), ("--l2_sim_lambda", "l2_sim_lambda", 10000),
    ("--background_preservation_loss", "background_preservation_loss", False),
    ("--invert_mask", "invert_mask", False), ("--no_enforce_background", "enforce_background", True),
    ("--aug_num", "aug_num", 8), ("--seed", "seed", 404), ("--batch_size", "batch_size", 4),
    ("--iterations_num", "iterations_num", 8), ("--output_path", "output_path", "output"),
    ("--output_file", "output_file", "output.png"), ("--mask", "mask", None), ("--gpu_id", "gpu_id", 0),
    ("--vid", "save_video", False), ("--export_assets", "export_assets", False),
]


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    """A 64x64 unconditional guided-diffusion checkpoint (cheaper than the 256 one)."""
    cfg = {k: v for k, v in tiny.UNET_64_CLASSES.items() if k != "num_classes"}
    return tiny.save_unet(tmp_path_factory.mktemp("small") / "64x64_uncond.pt", cfg)


@pytest.fixture
def photo(tmp_path):
    """An 8-bit 72x96 image and a mask file (grayscale, non-zero = edit)."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:96]
    arr = np.stack([xx * 2, yy * 3, (xx + yy)], -1) + g.integers(0, 30, (72, 96, 3))
    img = tmp_path / "photo.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(img)
    m = np.zeros((72, 96), np.uint8)
    m[20:50, 30:70] = 1  # a dark but non-zero value counts as masked (official rule)
    mask = tmp_path / "mask.png"
    Image.fromarray(m).save(mask)
    return img, mask


def run_cli(argv, capsys=None):
    rc = cli.main([str(a) for a in argv])
    return rc, (capsys.readouterr() if capsys else None)


# --- parsing ------------------------------------------------------------------------------------
def test_every_official_flag_has_the_official_default():
    args = cli.build_parser().parse_args(["edit", "-p", "a cat", "-i", "img.png"])
    assert args.prompt == "a cat" and args.init_image == "img.png"
    for flag, attr, default in OFFICIAL_DEFAULTS:
        assert getattr(args, attr) == default, flag
        assert type(getattr(args, attr)) is type(default), flag


def test_every_official_flag_parses_and_sets_its_value():
    argv = ["-p", "a dog", "-i", "in.png", "--mask", "m.png", "--skip_timesteps", "40",
            "--timestep_respacing", "ddim50", "--model_output_size", "512", "--ddim",
            "--local_clip_guided_diffusion", "--clip_guidance_lambda", "500", "--range_lambda", "10",
            "--lpips_sim_lambda", "3", "--l2_sim_lambda", "4", "--background_preservation_loss",
            "--invert_mask", "--no_enforce_background", "--aug_num", "16", "--seed", "7",
            "--batch_size", "2", "--iterations_num", "3", "--output_path", "outdir", "-o", "x.png",
            "--gpu_id", "1", "--vid", "--export_assets"]
    parser = cli.build_parser()
    for full in (["edit", *argv], cli._implicit_edit(argv)):  # pasted after `edit`, or alone
        a = parser.parse_args(full)
        assert (a.command, a.prompt, a.init_image, a.mask) == ("edit", "a dog", "in.png", "m.png")
        assert (a.skip_timesteps, a.timestep_respacing, a.model_output_size) == (40, "ddim50", 512)
        assert a.ddim and a.local_clip_guided_diffusion and a.background_preservation_loss and a.invert_mask
        assert not a.enforce_background and a.save_video and a.export_assets
        assert (a.clip_guidance_lambda, a.range_lambda, a.lpips_sim_lambda, a.l2_sim_lambda) == (500, 10, 3, 4)
        assert (a.aug_num, a.seed, a.batch_size, a.iterations_num, a.gpu_id) == (16, 7, 2, 3, 1)
        assert (a.output_path, a.output_file) == ("outdir", "x.png")
    long = parser.parse_args(["edit", "--prompt", "p", "--init_image", "i", "--output_file", "y.png"])
    assert (long.prompt, long.init_image, long.output_file) == ("p", "i", "y.png")
    extra = parser.parse_args(["edit", "--model", "m.pt", "--clip", "c.pt", "--device", "cpu",
                               "--precision", "bf16", "--fast"])
    assert (extra.model, extra.clip, extra.device, extra.precision, extra.fast) == ("m.pt", "c.pt", "cpu", "bf16", True)


def test_help_shows_every_default_and_names_each_side(capsys):
    """`SUBCOMMAND -h` shows the default of every option that has one (on/off flags and options without a value
    excepted), in the wording "(default: X)" or the help's own "default X"; extrapolate's sides read as English."""
    import argparse
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == set(cli.SUBCOMMANDS)
    shown = 0
    for name, sub in subs.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            default = action.default
            if not action.option_strings or default is None or isinstance(default, bool) or default in ([], "==SUPPRESS=="):
                continue
            text = " ".join(formatter._expand_help(action).split())
            assert re.search(rf"default:? {re.escape(str(default))}", text), (name, action.option_strings, text)
            shown += 1
    assert shown > 40
    with pytest.raises(SystemExit) as done:
        cli.main(["edit", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option, default in (("--skip_timesteps SKIP_TIMESTEPS", 25), ("--batch_size BATCH_SIZE", 4),
                            ("--iterations_num ITERATIONS_NUM", 8), ("--aug_num AUG_NUM", 8),
                            ("--output_path OUTPUT_PATH", "output"), ("--precision {auto,fp32,fp16,bf16}", "auto")):
        after = out[out.index(option, out.index("options:")):]
        assert after[after.index("(default"):].startswith(f"(default: {default})"), option
    with pytest.raises(SystemExit):
        cli.main(["extrapolate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "to the up" not in out and "to the down" not in out
    for side, words in (("left", "beyond its left edge"), ("right", "beyond its right edge"),
                        ("up", "above its top edge"), ("down", "below its bottom edge")):
        assert f"--{side} [PROMPT] extend the image {words} under this prompt" in out


def test_python_m_and_no_comfyui_import(tmp_path, ckpt_dir):
    """`python -m blended_diffusion` works when the pack is importable as a package (as pip installs it),
    and the CLI never imports ComfyUI (checked in a fresh interpreter)."""
    (tmp_path / "blended_diffusion").symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "BLENDED_DIFFUSION_MODELS": str(tmp_path / "none")}
    rank = ["rank", str(ROOT / "example_images"), "-p", "grass", "--clip", str(ckpt_dir / "ViT-B-16.pt"),
            "--output_path", str(tmp_path / "out")]
    code = ("import sys, runpy\n"
            "def run(argv):\n"
            "    sys.argv = ['blended_diffusion', *argv]\n"
            "    try:\n        runpy.run_module('blended_diffusion', run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n        return e.code\n"
            "helped = run(['edit', '--help'])\n"
            f"ranked = run({rank!r})\n"
            "host = [m for m in sys.modules if m.split('.')[0] in "
            "('comfy', 'comfy_api', 'comfy_execution', 'folder_paths', 'server', 'execution', 'nodes')]\n"
            "print('RC', helped, ranked, 'HOST', host)\n")
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RC 0 0 HOST []" in ran.stdout, ran.stdout + ran.stderr
    for flag, _, _ in OFFICIAL_DEFAULTS:
        assert flag in ran.stdout
    assert (tmp_path / "out" / "rank.json").is_file()


# --- edit ---------------------------------------------------------------------------------------
def test_edit_bundled_example_end_to_end(tmp_path, ckpt_dir, capsys):
    """No -i/--mask: the bundled example, with the default-named 256 checkpoint given by path."""
    out = tmp_path / "out"
    rc, cap = run_cli(["edit", "--model", ckpt_dir / "256x256_diffusion_uncond.pt",
                       "--clip", ckpt_dir / "ViT-B-16.pt", *ONE_STEP, "--batch_size", 1, "--iterations_num", 2,
                       "--output_path", out], capsys)
    assert rc == 0, cap.err
    rec = json.loads((out / "output.json").read_text())
    example, example_mask, prompt = cli.find_example()
    src = np.asarray(Image.open(example).convert("RGB"))
    masked = cli.load_mask(example_mask, src.shape[:2])[0].numpy() > 0

    # every parameter, the seeds and the scores are recorded
    for _, attr, _ in OFFICIAL_DEFAULTS:
        assert attr in rec["parameters"]
    assert rec["parameters"]["prompt"] == prompt and rec["resolved"]["denoising_steps"] == 1
    assert rec["argv"][:3] == ["edit", "--model", str(ckpt_dir / "256x256_diffusion_uncond.pt")]
    assert rec["resolved"]["algorithm"].startswith("Algorithm 2") and not rec["interrupted"]
    res = rec["results"]
    assert [r["rank"] for r in res] == [1, 2]
    assert sorted((r["iteration"], r["seed"]) for r in res) == [(0, 404), (1, 405)]
    scores = [r["score"] for r in res]
    assert scores == sorted(scores) and all(0 <= s <= 5 for s in scores)

    # results at the source's size; background exactly the source; ranked copies named by score
    ranked = sorted(p.name for p in (out / "ranked").iterdir())
    names = [Path(r["ranked_file"]).name for r in res]
    assert ranked == sorted(names) and [n[:5] for n in names] == sorted(n[:5] for n in names)  # name order = rank
    for r in res:
        assert Path(r["ranked_file"]).name == f"{r['score']:.4f}".replace(".", "") + "_" + r["file"]
        a = np.asarray(Image.open(out / r["file"]))
        assert a.shape == src.shape and r["size"] == [src.shape[1], src.shape[0]]
        assert np.array_equal(a[~masked], src[~masked])
        assert not np.array_equal(a[masked], src[masked])
        assert np.array_equal(a, np.asarray(Image.open(out / r["ranked_file"])))
    # the score is D_CLIP inside the mask: recomputing it from the saved file agrees
    from blended_diffusion.models import load_clip
    from blended_diffusion.models.apps import clip_scores
    again = clip_scores(load_clip(str(ckpt_dir / "ViT-B-16.pt")), cli.load_image(out / res[0]["file"]),
                        torch.from_numpy(masked.astype(np.float32))[None], prompt)
    assert abs(float(again[0]) - res[0]["score"]) < 2e-3

    sheet = Image.open(out / "output_sheet.png")  # source + mask + 2 results: 2x2 cells of 256 wide
    th = round(256 * src.shape[0] / src.shape[1])
    assert sheet.size == (2 * (256 + 6) + 6, 26 + 2 * (th + 22 + 6) + 6)
    assert "best:" in cap.out and str(out / res[0]["ranked_file"]) in cap.out


def test_edit_alg1_ddim_flags_and_assets(tmp_path, small_unet, ckpt_dir, photo):
    img, mask = photo
    out = tmp_path / "o"
    rc = cli.main(["edit", "-p", "a red square", "-i", str(img), "--mask", str(mask), "--invert_mask",
                   "--local_clip_guided_diffusion", "--background_preservation_loss", "--ddim", "--vid",
                   "--export_assets", "--model", str(small_unet), "--clip", str(ckpt_dir / "clip_sd.pt"),
                   *FAST, "--batch_size", "2", "--iterations_num", "1", "--seed", "9", "-o", "res.png",
                   "--output_path", str(out), "--device", "cpu", "--precision", "fp32", "--clip_precision", "bf16"])
    assert rc == 0
    rec = json.loads((out / "res.json").read_text())
    r = rec["resolved"]
    assert r["precision"] == "fp32" and r["clip_precision"] == "bf16"
    assert r["algorithm"].startswith("Algorithm 1") and r["blend"] is False
    assert r["enforce_background"] is False and r["model_image_size"] == 64
    assert rec["parameters"]["ddim"] and rec["parameters"]["background_preservation_loss"]
    assert sorted((x["seed"], x["batch_index"]) for x in rec["results"]) == [(9, 0), (9, 1)]
    for b in (0, 1):
        assert Image.open(out / f"res_i_0_b_{b}.png").size == (96, 72)
        gif = Image.open(out / f"res_i_0_b_{b}.gif")
        assert gif.n_frames == 2  # one x̂0 frame per denoising step
        assert (out / "assets" / f"res_i_0_b_{b}.png").is_file()
    exported = np.asarray(Image.open(out / "assets" / "res_mask.png").convert("L")) > 0
    m = np.asarray(Image.open(mask)) > 0
    assert np.array_equal(exported, ~m)  # --invert_mask: the edit is outside the drawn mask


def test_context_flag_sets_the_working_square(tmp_path, small_unet, photo, capsys):
    """--context (issue 11, point 9): Algorithm 1 regenerates the whole working square, the mask's box grown
    by context on each side (both ways here: 40 px at 0, 80 px at 0.5); a negative or infinite --context is
    refused before any model loads, by edit and by fidelity."""
    from blended_diffusion.models.region import plan_box
    img, mask = photo
    src = np.asarray(Image.open(img)).astype(int)
    m = torch.from_numpy((np.asarray(Image.open(mask)) > 0).astype(np.float32))
    for context in ("0", "0.5"):
        out = tmp_path / context
        rc, cap = run_cli(["edit", "-p", "", "-i", img, "--mask", mask, "--local_clip_guided_diffusion",
                           "--context", context, "--model", small_unet, *FAST, "--batch_size", "1",
                           "--iterations_num", "1", "--output_path", out, "--device", "cpu", "--precision", "fp32"],
                          capsys)
        assert rc == 0, cap.err
        ys, xs = np.nonzero((np.asarray(Image.open(out / "output_i_0_b_0.png")).astype(int) != src).any(-1))
        box = plan_box(m, 64, float(context))
        assert box.side == {"0": 40, "0.5": 80}[context]
        assert (ys.min(), ys.max() + 1) == (max(box.top, 0), min(box.top + box.side, 72)), context
        assert (xs.min(), xs.max() + 1) == (max(box.left, 0), min(box.left + box.side, 96)), context
        assert json.loads((out / "output.json").read_text())["parameters"]["context"] == float(context)
    for cmd in ("edit", "fidelity"):
        for bad in ("-1", "inf"):
            rc, cap = run_cli([cmd, "-p", "x", "-i", img, "--mask", mask, "--context", bad, "--offline",
                               "--output_path", tmp_path / "never"], capsys)
            assert rc == 1 and f"--context = {float(bad)}: it must be a finite number >= 0" in cap.err, cap.err
    assert not (tmp_path / "never").exists()


def test_cpu_runs_keep_freed_memory(tmp_path, small_unet, ckpt_dir, photo, monkeypatch):
    """On the CPU the CLI keeps freed memory in the process (models/memory.py; about 20% faster steps,
    tests/benchmark.py --keep-freed-memory); BLENDED_DIFFUSION_KEEP_FREED_MEMORY=0 leaves glibc's defaults."""
    from pack import refault_share
    from blended_diffusion.models import memory
    if not sys.platform.startswith("linux") or not memory.available():
        pytest.skip("glibc only")
    img, mask = photo
    argv = ["edit", "-p", "a red square", "-i", str(img), "--mask", str(mask), "--model", str(small_unet),
            "--clip", str(ckpt_dir / "clip_sd.pt"), *FAST, "--iterations_num", "1", "--device", "cpu",
            "--precision", "fp32"]
    try:
        memory.keep_freed_memory(False)
        monkeypatch.setenv("BLENDED_DIFFUSION_KEEP_FREED_MEMORY", "0")
        assert cli.main(argv + ["--output_path", str(tmp_path / "a")]) == 0
        assert refault_share() > 0.5
        monkeypatch.delenv("BLENDED_DIFFUSION_KEEP_FREED_MEMORY")
        assert cli.main(argv + ["--output_path", str(tmp_path / "b")]) == 0
        assert refault_share(256) < 0.1
    finally:
        memory.keep_freed_memory(False)


def test_cpu_run_names_the_device_and_estimates_the_job(tmp_path, small_unet, ckpt_dir, photo, capsys):
    """On the CPU, `edit` says so (and that it is slow) before loading the models, and after the first step
    logs once how long the whole job will take and which flags make it shorter."""
    img, mask = photo
    rc, cap = run_cli(["edit", "-p", "a red square", "-i", img, "--mask", mask, "--model", small_unet, "--clip",
                       ckpt_dir / "clip_sd.pt", *FAST, "--batch_size", 2, "--iterations_num", 3, "--device", "cpu",
                       "--output_path", tmp_path / "o"], capsys)
    assert rc == 0, cap.err
    lines = cap.err.splitlines()
    device = [i for i, line in enumerate(lines) if line.startswith("device: CPU (--device cpu), fp32")]
    loading = [i for i, line in enumerate(lines) if "loading models" in line]
    assert len(device) == 1 and "slow" in lines[device[0]] and device[0] < loading[0]
    estimates = [line for line in lines if "the whole job" in line]
    assert len(estimates) == 1, cap.err  # once, after the first step of the first iteration
    assert re.match(r"first step: \d+\.\d s for a batch of 2 → the whole job \(3 iteration\(s\) × 2 steps, "
                    r"batch 2\) takes about (\d+ s|\d+ min|\d+ h \d\d min|[\d.]+ days) on this CPU", estimates[0]), estimates[0]
    for flag in ("--iterations_num (now 3)", "--batch_size (now 2)", "--timestep_respacing (now 10)",
                 "--skip_timesteps (now 8, 2 steps run)", "--fast"):
        assert flag in estimates[0]


def test_job_estimate_is_step_time_times_steps_batches_and_iterations():
    assert cli.job_seconds(36.0, steps=75, chunks=1, iterations=8) == 21600
    assert cli.job_seconds(2.0, steps=10, chunks=3, iterations=2) == 120
    assert [cli.format_duration(s) for s in (3, 59.4, 600, 7380, 21600, 3.5 * 86400)] == [
        "3 s", "59 s", "10 min", "2 h 03 min", "6 h 00 min", "3.5 days"]
    # the default job at 36 s for a step of 4 results: 6 h; one result of 15 steps (20 respaced, 5 skipped,
    # the default's share): 36 / 4 × 15 s
    line = cli.cpu_estimate(36.0, batch=4, chunk=4, steps=75, iterations=8, respacing="100", skip=25)
    assert "takes about 6 h 00 min" in line
    assert "--timestep_respacing 20 --skip_timesteps 5 (15 steps, one result) takes about 2 min" in line


def test_edit_default_weights_from_models_folder_and_ctrl_c(tmp_path, small_unet, ckpt_dir, photo,
                                                           monkeypatch, capsys):
    """Without --model/--clip the default file names are found in $BLENDED_DIFFUSION_MODELS; Ctrl-C in
    the second iteration keeps the first iteration's results, JSON and contact sheet."""
    models = tmp_path / "models"
    (models / "ddpm").mkdir(parents=True)
    (models / "clip_guidance").mkdir()
    (models / "ddpm" / "256x256_diffusion_uncond.pt").write_bytes(small_unet.read_bytes())
    (models / "clip_guidance" / "ViT-B-16.pt").write_bytes((ckpt_dir / "ViT-B-16.pt").read_bytes())
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(models))

    calls = []
    real_call = cli.StepBar.__call__

    def interrupting(self, step, total, x0):
        calls.append(step)
        real_call(self, step, total, x0)
        if len(calls) == 3:  # first step of the second iteration
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.StepBar, "__call__", interrupting)
    img, mask = photo
    out = tmp_path / "o"
    rc, cap = run_cli(["edit", "-p", "a cat", "-i", img, "--mask", mask, *FAST, "--batch_size", 1,
                       "--iterations_num", 3, "--output_path", out, "--offline"], capsys)
    assert rc == 130
    rec = json.loads((out / "output.json").read_text())
    assert rec["interrupted"] is True and rec["finished_iterations"] == 1
    assert rec["resolved"]["model"] == str(models / "ddpm" / "256x256_diffusion_uncond.pt")
    assert rec["resolved"]["clip"] == str(models / "clip_guidance" / "ViT-B-16.pt")
    assert [x["file"] for x in rec["results"]] == ["output_i_0_b_0.png"]
    assert sorted(p.name for p in out.glob("output_i_*")) == ["output_i_0_b_0.png"]
    assert len(list((out / "ranked").iterdir())) == 1 and (out / "output_sheet.png").is_file()
    assert "interrupted" in cap.err


def test_edit_errors_are_clear(tmp_path, photo, monkeypatch, capsys):
    img, mask = photo
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "empty"))
    cases = [
        (["-i", img], "-p/--prompt is required"),
        (["-p", "x", "--mask", mask], "without -i"),
        (["-p", "x", "-i", tmp_path / "nope.png"], "image file not found"),
        (["-p", "x", "-i", img, "--timestep_respacing", "10", "--skip_timesteps", "10"], "leaves nothing"),
        (["-p", "x", "-i", img, "--batch_size", "0"], "--batch_size = 0"),
        (["-p", "x", "-i", img, "-o", "sub/out.png"], "must be a file name"),
    ]
    black = tmp_path / "black.png"
    Image.new("L", (96, 72)).save(black)
    cases.append((["-p", "x", "-i", img, "--mask", black], "selects no pixel"))
    for argv, message in cases:
        rc, cap = run_cli(["edit", *argv], capsys)
        assert rc == 1 and message in cap.err, (argv, cap.err)
    # offline without the weights: the file name, the URL and the folder to put it in
    rc, cap = run_cli(["edit", "-p", "x", "-i", img, "--offline"], capsys)
    from blended_diffusion.models import weights
    assert rc == 1
    for part in ("256x256_diffusion_uncond.pt", weights.DDPM_256.url, str(tmp_path / "empty" / "ddpm")):
        assert part in cap.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_missing_weights_are_all_named_in_one_error_before_any_download(tmp_path, photo, monkeypatch, capsys):
    """Every weight file the command needs is checked first: all missing ones in one error line (file, URL,
    folder, and the `weights` subcommand that lists and fetches them), offline, with a --model path that does
    not exist, and when the download host cannot be resolved (at once: no retries)."""
    import dataclasses
    import socket

    from blended_diffusion.models import weights as W
    models = tmp_path / "models"
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(models))
    img, mask = photo
    argv = ["edit", "-p", "a cat", "-i", img, "--mask", mask, *FAST, "--output_path", tmp_path / "o"]

    def one_error(cap, files):
        errors = error_lines(cap.err)
        assert len(errors) == 1 and "Traceback" not in cap.err, cap.err
        for wf in files:
            assert wf.name in errors[0] and wf.url in errors[0] and str(models / wf.folder) in errors[0], errors[0]
        assert "`blended-diffusion weights`" in errors[0] and "--download" in errors[0]
        return errors[0]

    rc, cap = run_cli([*argv, "--offline"], capsys)
    assert rc == 1
    one_error(cap, [W.DDPM_256, W.CLIP_VIT_B16])
    rc, cap = run_cli([*argv, "--offline", "--model", tmp_path / "nope.pt"], capsys)
    assert rc == 1
    assert "nope.pt: file not found" in one_error(cap, [W.CLIP_VIT_B16])

    try:
        socket.getaddrinfo("weights.invalid", 80)
        pytest.skip("this machine's resolver answers for weights.invalid")
    except socket.gaierror:
        pass
    for key, wf in (("ddpm_256", W.DDPM_256), ("clip", W.CLIP_VIT_B16)):
        monkeypatch.setitem(W.DEFAULT_WEIGHTS, key, dataclasses.replace(wf, url=f"http://weights.invalid/{wf.name}"))
    rc, cap = run_cli(argv, capsys)
    assert rc == 1 and "retry" not in cap.err
    line = one_error(cap, list(W.DEFAULT_WEIGHTS[k] for k in ("ddpm_256", "clip")))
    assert "weights.invalid cannot be resolved" in line
    assert not models.exists() or not any(models.rglob("*.part"))


def test_output_folder_is_checked_before_anything_is_loaded(tmp_path, small_unet, ckpt_dir, photo, capsys):
    """An --output_path that cannot hold results (a path under a regular file, a regular file, /proc, /sys:
    both refuse new files even for root) is one error line before any model is loaded or anything
    sampled, for every subcommand that writes; the file is untouched and nothing is created."""
    img, mask = photo
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    models = ["--model", small_unet, "--clip", ckpt_dir / "clip_sd.pt", "--device", "cpu"]
    edit = ["edit", "-p", "a cat", "-i", img, "--mask", mask, *ONE_STEP, "--batch_size", 1, "--iterations_num", 1,
            *models]
    cases = [(afile / "out", f"{afile} is a file, not a folder"), (afile, "is a file, not a folder"),
             (Path("/proc/blended_diffusion_out"), "cannot create a folder in /proc"),
             (Path("/sys/blended_diffusion_out/results"), "cannot create a folder in /sys")]
    for out, message in cases:
        rc, cap = run_cli([*edit, "--output_path", out], capsys)
        errors = error_lines(cap.err)
        assert rc == 1 and len(errors) == 1 and message in errors[0] and str(out) in errors[0], cap.err
        assert "Traceback" not in cap.err and "loading models" not in cap.err and "loaded" not in cap.err
    others = [["extrapolate", "-i", img, "--right", "a forest", "--timestep_respacing", "10", "--k_min", "1",
               "--k_max", "1", "--final_k", "0", "--aug_num", "2", *models],
              ["rank", img, "-p", "a cat", "--clip", ckpt_dir / "clip_sd.pt"],
              ["fidelity", "-i", img, "--mask", mask, "-p", "a cat", "--timestep_respacing", "10",
               "--skip-timesteps", "9", "--aug_num", "2", *models],
              ["run", "01_text_edit_ranked"]]
    for argv in others:
        rc, cap = run_cli([*argv, "--output_path", afile / "out"], capsys)
        errors = error_lines(cap.err)
        assert rc == 1 and len(errors) == 1 and "is a file, not a folder" in errors[0], (argv[0], cap.err)
        assert "loading models" not in cap.err and "Traceback" not in cap.err
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile.txt", "mask.png", "photo.png"]


def _without_permission_override():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    program run next obeys file permission bits like any user (root keeps them otherwise)."""
    if os.geteuid() != 0:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_output_folder_without_write_permission(tmp_path, small_unet, ckpt_dir, photo):
    """A folder with mode 0o555 (and a new folder inside it) is refused before models load. The CLI runs in a
    child process that obeys permission bits also when the tests run as root (see _without_permission_override):
    the kernel refuses the write with EACCES, as it does for any user."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"], capture_output=True,
                               preexec_fn=_without_permission_override, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run a process that obeys permission bits here ({e})")
    if probe.returncode == 0:
        pytest.skip("this process may write into a 0o555 folder (permission bits not enforced here)")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "blended_diffusion").symlink_to(ROOT, target_is_directory=True)
    img, mask = photo
    base = ["edit", "-p", "a cat", "-i", img, "--mask", mask, *ONE_STEP, "--batch_size", "1", "--iterations_num",
            "1", "--model", small_unet, "--clip", ckpt_dir / "clip_sd.pt", "--device", "cpu"]
    code = ("import sys\nfrom blended_diffusion import cli\n"
            f"print('RC', cli.main({[str(a) for a in base]!r} + ['--output_path', sys.argv[1]]))\n")
    for out, what in ((ro, "cannot write files in"), (ro / "new", "cannot create a folder in")):
        ran = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
                             preexec_fn=_without_permission_override)
        errors = error_lines(ran.stderr)
        assert "RC 1" in ran.stdout and len(errors) == 1, ran.stdout + ran.stderr
        assert f"{what} {ro}" in errors[0] and "Permission denied" in errors[0], errors[0]
        assert "loading models" not in ran.stderr and "Traceback" not in ran.stderr
    assert list(ro.iterdir()) == []


def test_contact_sheet_tiles_of_extreme_aspects_stay_visible(tmp_path):
    """A 10000×50 strip (and a 50×10000 one) fills a visible tile, at least 32 px on its short side, instead of
    a 1-px line; an ordinary image keeps its aspect ratio, and a small one is not enlarged."""
    def tile_boxes(sheet, colour):
        arr = np.asarray(sheet).astype(int)
        hit = (np.abs(arr - np.array(colour)) < 40).all(-1)
        half = arr.shape[1] // 2  # two tiles side by side: left and right halves
        boxes = []
        for part in (hit[:, :half], hit[:, half:]):
            ys, xs = np.nonzero(part)
            boxes.append((xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
        return boxes

    red, blue, green = (200, 30, 30), (30, 30, 200), (30, 160, 30)
    wide = Image.new("RGB", (10000, 50), red)
    for w, h in tile_boxes(cli.contact_sheet([(wide, "a"), (wide, "b")], tmp_path / "wide.png"), red):
        assert w == 256 and h >= 32
    tall = Image.new("RGB", (50, 10000), blue)
    for w, h in tile_boxes(cli.contact_sheet([(tall, "a"), (tall, "b")], tmp_path / "tall.png"), blue):
        assert h == 1024 and w >= 32
    normal = Image.new("RGB", (960, 720), green)
    for w, h in tile_boxes(cli.contact_sheet([(normal, "a"), (normal, "b")], tmp_path / "normal.png"), green):
        assert (w, h) == (256, 192)
    small = Image.new("RGB", (96, 72), green)
    for w, h in tile_boxes(cli.contact_sheet([(small, "a"), (small, "b")], tmp_path / "small.png"), green):
        assert (w, h) == (96, 72)


def test_mask_files(tmp_path):
    """Any non-zero pixel is masked: grayscale, colour (any channel), 16-bit; with transparency,
    the transparent pixels (ComfyUI's LoadImage convention); resized nearest; --invert_mask."""
    m = np.zeros((8, 12), np.uint8)
    m[2:5, 3:7] = 1
    expect = m > 0
    cases = {"gray.png": Image.fromarray(m),
             "rgb.png": Image.fromarray(np.stack([np.zeros_like(m), m * 0, m * 200], -1)),
             "i16.png": Image.fromarray(m.astype(np.uint16) * 300)}
    rgba = np.full((8, 12, 4), 255, np.uint8)  # ComfyUI's convention: transparent = edit
    rgba[..., 3] = 255 - m * 255
    cases["alpha.png"] = Image.fromarray(rgba, "RGBA")
    opaque = np.zeros((8, 12, 4), np.uint8)    # fully opaque RGBA: the colour rule applies
    opaque[..., 0], opaque[..., 3] = m * 9, 255
    cases["opaque.png"] = Image.fromarray(opaque, "RGBA")
    for name, im in cases.items():
        im.save(tmp_path / name)
        got = cli.load_mask(tmp_path / name, (8, 12))
        assert got.shape == (1, 8, 12) and got.dtype == torch.float32
        assert np.array_equal(got[0].numpy() > 0, expect), name
        assert np.array_equal(cli.load_mask(tmp_path / name, (8, 12), invert=True)[0].numpy() > 0, ~expect)
    big = cli.load_mask(tmp_path / "gray.png", (16, 24))[0].numpy() > 0  # nearest: blocks of 2x2
    assert np.array_equal(big, np.kron(expect, np.ones((2, 2), bool)))


# --- extrapolate, rank, run, weights ------------------------------------------------------------
def test_extrapolate_end_to_end(tmp_path, small_unet, ckpt_dir, photo):
    img, _ = photo
    out = tmp_path / "x"
    rc = cli.main(["extrapolate", "-i", str(img), "--right", "a forest", "--left", "--prompt", "a lake",
                   "--amount", "0.15", "--timestep_respacing", "10", "--k_min", "1", "--k_max", "1",
                   "--final_k", "1", "--aug_num", "2", "--model", str(small_unet),
                   "--clip", str(ckpt_dir / "clip.safetensors"), "--output_path", str(out)])
    assert rc == 0
    rec = json.loads((out / "extrapolated.json").read_text())
    assert rec["resolved"]["prompts"] == {"left": "a lake", "right": "a forest"}
    result = Image.open(out / "extrapolated.png")
    # worked at the model's height (64): 96x72 → 85x64, then + ceil(0.15·85) on each of the two sides
    w0 = round(96 * 64 / 72)
    w2 = w0 + 2 * int(np.ceil(0.15 * w0))
    assert result.size == (w2, 64) and rec["output_size"] == [w2, 64] and rec["input_size"] == [96, 72]


def test_extrapolate_needs_a_side(tmp_path, capsys):
    rc, cap = run_cli(["extrapolate", "-i", tmp_path / "a.png"], capsys)
    assert rc == 1 and "--left/--right/--up/--down" in cap.err


def test_rank_end_to_end(tmp_path, ckpt_dir, photo, capsys):
    img, mask = photo
    folder = tmp_path / "results"
    folder.mkdir()
    base = np.asarray(Image.open(img))
    for k, shift in enumerate((0, 60, 120)):
        Image.fromarray(np.roll(base, shift, axis=1)).save(folder / f"r{k}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "o"
    rc, cap = run_cli(["rank", folder, img, "-p", "a colourful gradient", "--mask", mask,
                       "--clip", ckpt_dir / "ViT-B-16.pt", "--output_path", out, "--top_k", 3], capsys)
    assert rc == 0
    rec = json.loads((out / "rank.json").read_text())
    res = rec["results"]
    assert len(res) == 4 and [r["rank"] for r in res] == [1, 2, 3, 4]
    assert [r["score"] for r in res] == sorted(r["score"] for r in res)
    copies = sorted((out / "ranked").iterdir())
    assert len(copies) == 3 and res[3]["file"] is None  # --top_k 3
    for r in res[:3]:
        copy = out / r["file"]
        assert copy.name == cli.score_token(r["score"]) + "_" + Path(r["source"]).name
        assert copy.read_bytes() == Path(r["source"]).read_bytes()  # exact copies
    assert "best:" in cap.out


def test_rank_reads_every_image_and_the_mask_before_loading_clip(tmp_path, ckpt_dir, photo, capsys):
    """A broken file anywhere in the list, or a mask that selects nothing, stops `rank` before CLIP is loaded."""
    img, mask = photo
    folder = tmp_path / "results"
    folder.mkdir()
    for k in range(3):
        (folder / f"r{k}.png").write_bytes(img.read_bytes())
    (folder / "r9.png").write_bytes(b"not a png")
    black = tmp_path / "black.png"
    Image.new("L", (96, 72)).save(black)
    for argv, message in (([folder], "r9.png: not a readable image"),
                          ([img, "--mask", black], "selects no pixel")):
        rc, cap = run_cli(["rank", *argv, "-p", "a cat", "--clip", ckpt_dir / "clip_sd.pt", "--output_path",
                           tmp_path / "o"], capsys)
        errors = error_lines(cap.err)
        assert rc == 1 and len(errors) == 1 and message in errors[0], cap.err
        assert "loading models" not in cap.err and not (tmp_path / "o").exists()


def _bundled_workflow():
    api = ROOT / "workflows" / "api"
    found = sorted(api.glob("*.json")) if api.is_dir() else []
    assert found, "workflows/api/*.json is missing: the `run` subcommand has nothing to run"
    for p in found:  # prefer the plain ranked text edit
        if "text_edit" in p.stem:
            return p
    return found[0]


def _fast_overrides(workflow: dict) -> list[str]:
    """--set arguments that make any bundled workflow cheap on tiny checkpoints."""
    fast = {"respacing": "10", "skip_timesteps": 9, "num_views": 2, "batch_size": 1, "top_k": 0,
            "amount": 0.1, "strength": 0.0}
    sets = []
    for nid, node in workflow.items():
        for name, value in node.get("inputs", {}).items():
            if name in fast and not isinstance(value, list):
                sets += ["--set", f"{nid}.{name}={json.dumps(fast[name])}"]
    return sets


def test_run_bundled_workflow_end_to_end(tmp_path, ckpt_dir, monkeypatch, capsys):
    path = _bundled_workflow()
    wf = json.loads(path.read_text())
    models = tmp_path / "models"
    (models / "ddpm").mkdir(parents=True)
    (models / "clip_guidance").mkdir()
    (models / "ddpm" / "256x256_diffusion_uncond.pt").symlink_to(ckpt_dir / "256x256_diffusion_uncond.pt")
    (models / "clip_guidance" / "ViT-B-16.pt").symlink_to(ckpt_dir / "ViT-B-16.pt")
    seed_sets = [f"{nid}.seed=5" for nid, n in wf.items() if "seed" in n.get("inputs", {})
                 and not isinstance(n["inputs"]["seed"], list)]
    sets = _fast_overrides(wf) + [x for s in seed_sets for x in ("--set", s)]
    out = tmp_path / "out"
    rc, cap = run_cli(["run", path, *sets, "--models_dir", models, "--output_path", out], capsys)
    assert rc == 0, cap.err
    rec = json.loads((out / f"{path.stem}.run.json").read_text())
    assert rec["outputs"]
    for f in rec["outputs"]:
        assert Path(f).is_file() and out in Path(f).parents and min(Image.open(f).size) > 0
    for s in seed_sets:  # the overrides reached the graph
        nid = s.split(".")[0]
        assert rec["applied"][nid]["seed"] == 5 and rec["overrides"][nid]["seed"] == 5
    saved = [n for n in wf.values() if n["class_type"] == "SaveImage"]
    if saved and any(n["class_type"] == "BlendedDiffusionSampler" for n in wf.values()):
        prefix = saved[0]["inputs"]["filename_prefix"]
        results = [f for f in rec["outputs"] if Path(f).relative_to(out).as_posix().startswith(prefix)]
        assert len(results) == 1  # --set ….batch_size=1
        loads = [n["inputs"]["image"] for n in wf.values() if n["class_type"] == "LoadImage"]
        assert Image.open(results[0]).size == Image.open(ROOT / "example_images" / loads[0]).size
    assert "file(s) saved" in cap.out


def test_run_override_errors(tmp_path, capsys):
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
          "2": {"class_type": "BlendedDiffusionSampler", "inputs": {"seed": 1, "ddpm": ["1", 0]}}}
    p = tmp_path / "wf.json"
    p.write_text(json.dumps(wf))
    assert cli.parse_override("3.seed=5") == ("3", "seed", 5)
    assert cli.parse_override("6.text=a red ball") == ("6", "text", "a red ball")
    assert cli.parse_override('6.text="7"') == ("6", "text", "7")
    for sets, message in ((["9.seed=1"], "no node '9'"), (["2.ddpm=3"], "is a link"),
                          (["2.bogus=3"], "has no input 'bogus'"), (["seed=3"], "NODE_ID.INPUT=VALUE")):
        rc, cap = run_cli(["run", p, *[x for s in sets for x in ("--set", s)]], capsys)
        assert rc == 1 and message in cap.err, (sets, cap.err)
    rc, cap = run_cli(["run", "no_such_workflow"], capsys)
    assert rc == 1 and "not found" in cap.err


def test_failed_run_leaves_no_output_folder(tmp_path, capsys):
    """A workflow that fails (here: its model file is missing) leaves no empty output folder behind."""
    (tmp_path / "models" / "ddpm").mkdir(parents=True)
    out = tmp_path / "a" / "out"
    rc, cap = run_cli(["run", "01_text_edit_ranked", "--models_dir", tmp_path / "models", "--output_path", out],
                      capsys)
    assert rc == 1 and "256x256_diffusion_uncond.pt" in cap.err
    assert not (tmp_path / "a").exists()


def test_weights_subcommand(tmp_path, monkeypatch, capsys):
    from blended_diffusion.models import weights
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path))
    rc, cap = run_cli(["weights"], capsys)
    assert rc == 1 and "MISSING" in cap.out and weights.DDPM_256.url in cap.out
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "clip_guidance").mkdir()
    (tmp_path / "ddpm" / "256x256_diffusion_uncond.pt").write_bytes(b"x")
    (tmp_path / "clip_guidance" / "ViT-B-16.pt").write_bytes(b"x")
    rc, cap = run_cli(["weights"], capsys)
    assert rc == 0 and "MISSING" not in cap.out and str(tmp_path / "ddpm" / "256x256_diffusion_uncond.pt") in cap.out


def test_weights_download_from_local_server(tmp_path, ckpt_dir, monkeypatch, capsys):
    """`weights --download` fetches the missing default files (here from 127.0.0.1), checks their
    sha256 and leaves them where `edit` looks for them."""
    import functools
    import hashlib
    import http.server
    import threading

    from blended_diffusion.models import weights as W
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ckpt_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for key, wf in (("ddpm_256", W.DDPM_256), ("clip", W.CLIP_VIT_B16)):
            data = (ckpt_dir / wf.name).read_bytes()
            monkeypatch.setitem(W.DEFAULT_WEIGHTS, key, W.WeightFile(
                name=wf.name, folder=wf.folder, url=f"{base}/{wf.name}", description=wf.description,
                sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
        monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path))
        rc, cap = run_cli(["weights", "--download"], capsys)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rc == 0, cap.err
    for wf in (W.DDPM_256, W.CLIP_VIT_B16):
        got = tmp_path / wf.folder / wf.name
        assert got.read_bytes() == (ckpt_dir / wf.name).read_bytes()
        assert not got.with_name(wf.name + ".part").exists()
        assert wf.name in cap.err  # its progress bar


# --- fidelity -----------------------------------------------------------------------------------
def _csv_rows(path: Path) -> list[list[str]]:
    lines = path.read_text().strip().split("\n")
    assert lines[0] == "method,parameter,value,lpips,clip_distance"
    return [line.split(",") for line in lines[1:]]


def test_fidelity_blended_sweep_end_to_end(tmp_path, small_unet, ckpt_dir, photo, capsys):
    """One row per skip value in the given order, finite numbers that are the measurements of the results
    (re-measured from the saved images), results that keep the source outside the mask, and the plot."""
    from blended_diffusion.models import fidelity as fid
    from blended_diffusion.models import load_clip
    img, mask = photo
    out = tmp_path / "f"
    rc, cap = run_cli(["fidelity", "-p", "a red square", "-i", img, "--mask", mask, "--model", small_unet,
                       "--clip", ckpt_dir / "ViT-B-16.pt", "--timestep_respacing", 10, "--skip-timesteps", "7, 9",
                       "--aug_num", 2, "--save-images", "--output_path", out], capsys)
    assert rc == 0, cap.err
    rows = _csv_rows(out / "fidelity.csv")
    assert [(r[0], r[1], r[2]) for r in rows] == [("Blended Diffusion", "skip_timesteps", "7"),
                                                  ("Blended Diffusion", "skip_timesteps", "9")]
    rec = json.loads((out / "fidelity.json").read_text())
    assert not rec["interrupted"] and rec["resolved"]["sd_checkpoint"] is None
    assert [e["value"] for e in rec["rows"]] == [7, 9]
    src = np.asarray(Image.open(img).convert("RGB"))
    masked = np.asarray(Image.open(mask)) > 0
    clip = load_clip(str(ckpt_dir / "ViT-B-16.pt"))
    source, m = cli.load_image(img), cli.load_mask(mask, src.shape[:2])
    for r, e in zip(rows, rec["rows"]):
        lp, dist = float(r[3]), float(r[4])
        assert np.isfinite([lp, dist]).all() and lp >= 0 and 0 <= dist <= 5
        assert (lp, dist) == (pytest.approx(e["lpips"], abs=1e-6), pytest.approx(e["clip_distance"], abs=1e-6))
        a = np.asarray(Image.open(out / e["file"]))
        assert a.shape == src.shape and np.array_equal(a[~masked], src[~masked])
        (lp2, dist2), = fid.measure(cli.load_image(out / e["file"]), source, clip, "a red square", m)
        assert abs(lp2 - lp) < 2e-3 and abs(dist2 - dist) < 2e-3  # (8-bit rounding of the saved file)
    plot = Image.open(out / "fidelity.png")
    assert plot.size == PLOT_SIZE and plot.mode == "RGB"
    assert np.asarray(plot).std() > 10  # axes, grid, labels and the curve on white
    assert "skip=7" in cap.out and str(out / "fidelity.csv") in cap.out


def test_fidelity_ctrl_c_keeps_the_finished_rows(tmp_path, small_unet, ckpt_dir, photo, monkeypatch, capsys):
    from blended_diffusion.models import fidelity as fid
    real, calls = fid.measure, []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fid, "measure", interrupting)
    img, mask = photo
    out = tmp_path / "f"
    rc, cap = run_cli(["fidelity", "-p", "a cat", "-i", img, "--mask", mask, "--model", small_unet,
                       "--clip", ckpt_dir / "clip_sd.pt", "--timestep_respacing", 10, "--skip-timesteps", "9,8,7",
                       "--aug_num", 2, "--output_path", out], capsys)
    assert rc == 130 and "interrupted" in cap.err
    assert [r[2] for r in _csv_rows(out / "fidelity.csv")] == ["9"]
    assert json.loads((out / "fidelity.json").read_text())["interrupted"] is True
    assert Image.open(out / "fidelity.png").size == PLOT_SIZE


def test_fidelity_errors_are_clear(tmp_path, ckpt_dir, photo, monkeypatch, capsys):
    """Bad input fails before any model loads (exit 1, the CLI's error code), with the fix in the message."""
    import importlib.util
    img, mask = photo
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "empty"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    ckpt = tmp_path / "sd15.safetensors"
    ckpt.write_bytes(b"x")
    not_comfy = tmp_path / "not_comfyui"
    not_comfy.mkdir()
    black = tmp_path / "black.png"
    Image.new("L", (96, 72)).save(black)
    never = tmp_path / "never"
    base = ["fidelity", "-p", "a cat", "-i", img, "--offline", "--output_path", never]
    cases = [
        (base, "needs --mask"),
        (["fidelity", "-i", img, "--mask", mask], "-p/--prompt is required"),
        ([*base, "--mask", mask, "--timestep_respacing", "10", "--skip-timesteps", "5,10"],
         "--skip-timesteps = '5,10': give one or more values, each in [0, 9]"),
        ([*base, "--mask", mask, "--skip-timesteps", "a,b"], "numbers separated by commas"),
        ([*base, "--mask", black], "selects no pixel"),
        ([*base, "--mask", mask, "--inversion", ckpt], "--inversion belongs to the SDEdit sweep"),
        ([*base, "--sd-checkpoint", tmp_path / "missing.safetensors"], "file not found"),
        (["fidelity", "-p", "a cat", "--sd-checkpoint", ckpt], "needs -i IMAGE to invert"),
        ([*base, "--sd-checkpoint", ckpt], "--source-prompt CAPTION is required"),
        ([*base, "--sd-checkpoint", ckpt, "--source-prompt", "a dog", "--t0", "0,0.5"], "--t0 = '0,0.5'"),
        ([*base, "--sd-checkpoint", ckpt, "--source-prompt", "a dog", "--comfyui", not_comfy],
         "not a ComfyUI installation"),
    ]
    if importlib.util.find_spec("comfy") is None:  # no --comfyui, no COMFYUI_PATH, nothing importable
        cases.append(([*base, "--sd-checkpoint", ckpt, "--source-prompt", "a dog"], "ComfyUI is not importable"))
    for argv, message in cases:
        rc, cap = run_cli(argv, capsys)
        assert rc == 1 and message in cap.err, (argv, cap.err)
        if "ComfyUI" in message:  # the fix is named
            assert "--comfyui DIR" in cap.err and "COMFYUI_PATH" in cap.err
    assert not never.exists()  # nothing written
    with pytest.raises(SystemExit) as exc:  # argparse's usage errors: exit status 2
        cli.main(["fidelity", "-p", "x", "--skip-timesteps"])
    assert exc.value.code == 2 and "--skip-timesteps" in capsys.readouterr().err


def test_fidelity_method_and_compare_flags_are_checked_first(tmp_path, photo, monkeypatch, capsys):
    """--method / --global-null / --compare-methods: bad combinations fail before ComfyUI or a model loads."""
    from blended_diffusion.cli import fidelity
    from blended_diffusion.models import inversion as ni
    assert fidelity.METHODS == ni.METHODS  # the parser's copy (no torch import to build it)
    img, mask = photo
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "empty"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    ckpt = tmp_path / "sd15.safetensors"
    ckpt.write_bytes(b"x")
    never = tmp_path / "never"
    sd = ["fidelity", "-i", img, "--sd-checkpoint", ckpt, "--source-prompt", "a dog", "--output_path", never]
    cases = [
        ([*sd, "-p", "a cat", "--method", "direct", "--global-null"], "--global-null applies to NULL-text only"),
        (["fidelity", "-i", img, "--source-prompt", "a dog", "--compare-methods", "direct"],
         "--compare-methods needs --sd-checkpoint FILE"),
        ([*sd, "--compare-methods", "direct, ddim"],
         "'ddim' is not an inversion method: give a comma-separated list of null-text, null-text global, "
         "negative-prompt, direct"),
        ([*sd, "--compare-methods", "direct,direct"], "'direct' is listed twice"),
        ([*sd, "--compare-methods", " "], "methods is empty"),
        ([*sd, "--compare-methods", "direct", "--inversion", ckpt], "drop --inversion"),
        (["fidelity", "-i", img, "--sd-checkpoint", ckpt, "--compare-methods", "direct"],
         "--source-prompt CAPTION is required"),
        ([*sd, "--compare-methods", "direct", "--steps", 1], "--steps = 1"),
    ]
    for argv, message in cases:
        rc, cap = run_cli(argv, capsys)
        assert rc == 1 and message in cap.err, (argv, cap.err)
    assert not never.exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["fidelity", "-p", "x", "--method", "ddim"])
    assert exc.value.code == 2 and "--method" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["fidelity", "--method", "null-text global"])
    assert args.method == "null-text global" and not args.global_null and args.compare_methods is None


# SDEdit with and without NULL-text inversion: a Stable Diffusion checkpoint loaded through ComfyUI
COMFY = os.environ.get("COMFYUI_PATH", "")


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory):
    if not COMFY or not (Path(COMFY) / "comfy" / "sd.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout (and use its Python) to run fidelity --sd-checkpoint")
    try:
        import tiny_sd
        return tiny_sd.write_sd15_checkpoint(tmp_path_factory.mktemp("sd") / "tiny_sd15.safetensors")
    except ImportError as e:
        pytest.skip(f"ComfyUI at {COMFY} does not import here ({e}): run with its interpreter")


def test_fidelity_sdedit_with_comfyui_checkpoint(tmp_path, sd_checkpoint, small_unet, ckpt_dir, capsys):
    """Invert with the checkpoint, sweep t0 with and without the inversion and Blended Diffusion in one plot;
    then the saved inversion (--inversion) reproduces the same rows without -i."""
    from blended_diffusion.models import fidelity as fid
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.stack([xx * 4, yy * 4, 255 - 2 * (xx + yy)], -1)
    arr[20:44, 24:40] = (230, 50, 50)
    img = tmp_path / "square.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(img)
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    mask = tmp_path / "m.png"
    Image.fromarray(m).save(mask)
    common = ["-p", "a photo of a dog", "--mask", mask, "--sd-checkpoint", sd_checkpoint, "--comfyui", COMFY,
              "--t0", "0.5,1.0", "--skip-timesteps", 8, "--timestep_respacing", 10, "--aug_num", 2,
              "--model", small_unet, "--clip", ckpt_dir / "ViT-B-16.pt", "--device", "cpu"]
    inv_file = tmp_path / "inv.safetensors"
    rc, cap = run_cli(["fidelity", *common, "-i", img, "--source-prompt", "a photo of a cat", "--steps", 4,
                       "--inner-steps", 2, "--save-inversion", inv_file, "--save-images",
                       "--output_path", tmp_path / "a"], capsys)
    assert rc == 0, cap.err
    rows = _csv_rows(tmp_path / "a" / "fidelity.csv")
    assert [(r[0], r[2]) for r in rows] == [("SDEdit after NULL-text inversion", "0.5"),
                                            ("SDEdit after NULL-text inversion", "1"),
                                            ("plain SDEdit", "0.5"), ("plain SDEdit", "1"),
                                            ("Blended Diffusion", "8")]
    assert all(np.isfinite([float(r[3]), float(r[4])]).all() for r in rows)
    rec = json.loads((tmp_path / "a" / "fidelity.json").read_text())
    assert rec["resolved"]["steps"] == 4 and rec["resolved"]["source_size"] == [64, 64]
    assert rec["inversion_report"]["steps"] == 4 and inv_file.is_file()
    for e in rec["rows"]:
        assert Image.open(tmp_path / "a" / e["file"]).size == (64, 64)
    assert Image.open(tmp_path / "a" / "fidelity.png").size == PLOT_SIZE
    # the saved inversion: the same SDEdit-after-inversion and Blended Diffusion rows, no plain SDEdit
    rc, cap = run_cli(["fidelity", *common, "--inversion", inv_file, "--no-plain-sdedit",
                       "--output_path", tmp_path / "b"], capsys)
    assert rc == 0, cap.err
    again = _csv_rows(tmp_path / "b" / "fidelity.csv")
    want = [rows[0], rows[1], rows[4]]
    assert [r[:3] for r in again] == [r[:3] for r in want]  # the numbers agree to float noise (6th decimal)
    assert [float(v) for r in again for v in r[3:]] == pytest.approx([float(v) for r in want for v in r[3:]],
                                                                      rel=1e-5, abs=1e-5)


def _square_photo(tmp_path) -> Path:
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.stack([xx * 4, yy * 4, 255 - 2 * (xx + yy)], -1)
    arr[20:44, 24:40] = (230, 50, 50)
    img = tmp_path / "square.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(img)
    return img


def test_fidelity_method_direct_and_compare_methods(tmp_path, sd_checkpoint, ckpt_dir, monkeypatch, capsys):
    """--method direct inverts with Direct Inversion (the saved file says so, the sweep names it); --compare-methods
    writes the comparison's CSV, table, record and images."""
    from blended_diffusion.models import compare as cmp
    from blended_diffusion.models import inversion as ni
    from blended_diffusion.render import TABLE_ROW, TABLE_TOP, table_row_height
    img = _square_photo(tmp_path)
    base = ["fidelity", "-i", img, "--sd-checkpoint", sd_checkpoint, "--comfyui", COMFY, "--source-prompt",
            "a photo of a cat", "--steps", 4, "--device", "cpu"]
    inv_file = tmp_path / "direct.safetensors"
    rc, cap = run_cli([*base, "-p", "a photo of a dog", "--method", "direct", "--t0", "1.0", "--no-plain-sdedit",
                       "--clip", ckpt_dir / "ViT-B-16.pt", "--save-inversion", inv_file,
                       "--output_path", tmp_path / "a"], capsys)
    assert rc == 0, cap.err
    inv = ni.Inversion.from_file(inv_file)
    assert inv.method == "direct" and len(inv.corrections) == 4 and inv.info["latent_mse"] < 1e-9
    assert [r[0] for r in _csv_rows(tmp_path / "a" / "fidelity.csv")] == ["SDEdit after direct inversion"]
    out = tmp_path / "b"
    rc, cap = run_cli([*base, "--compare-methods", "negative-prompt, direct", "--save-images",
                       "--output_path", out], capsys)
    assert rc == 0, cap.err
    text = (out / "compare.csv").read_text()
    rows = {r.method: r for r in cmp.read_csv(text)}
    assert list(rows) == ["vae", "negative-prompt", "direct"]
    assert rows["direct"].latent_mse < 1e-9 and rows["direct"].eps_calls == rows["negative-prompt"].eps_calls == 8
    assert Image.open(out / "compare.png").size == (720, TABLE_TOP + TABLE_ROW + 3 * table_row_height(True) + 8)
    rec = json.loads((out / "compare.json").read_text())
    assert rec["resolved"]["methods"] == ["negative-prompt", "direct"] and rec["resolved"]["steps"] == 4
    assert [r["method"] for r in rec["rows"]] == list(rows) and rec["rows"][0]["psnr_vae_db"] is None
    assert rec["images"] == ["compare_images/00_source.png", "compare_images/01_vae.png",
                             "compare_images/02_negative_prompt.png", "compare_images/03_direct.png"]
    assert all(Image.open(out / f).size == (64, 64) for f in rec["images"])
    assert "direct" in cap.out and "method comparison" in cap.out
    # Ctrl-C during the second method keeps the finished rows (exit 130)
    real = ni.invert

    def invert(*a, method="null-text", **kw):
        if method == "direct":
            raise KeyboardInterrupt
        return real(*a, method=method, **kw)

    monkeypatch.setattr(ni, "invert", invert)
    rc, cap = run_cli([*base, "--compare-methods", "negative-prompt, direct", "--output_path", out], capsys)
    assert rc == 130 and "kept the 2 finished row(s) of 3" in cap.err
    assert [r.method for r in cmp.read_csv((out / "compare.csv").read_text())] == ["vae", "negative-prompt"]
    assert json.loads((out / "compare.json").read_text())["interrupted"] is True
