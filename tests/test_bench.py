"""`bench`: PIE-Bench-layout and manifest datasets, the metrics on hand-checked cases, resume and failures, and
runs on a real Ray cluster (2 CPU workers) against the local runner, including a worker killed mid-run, from a
pack folder named comfyui-blended-diffusion. The SD methods run when COMFYUI_PATH names a ComfyUI checkout."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from blended_diffusion import cli
from blended_diffusion.cli.bench import data, report
from blended_diffusion.cli.bench.runner import CRASH_ENV, RESULTS
from blended_diffusion.models import metrics

ROOT = Path(__file__).resolve().parents[1]
# 2 steps, one thread (two threads on a busy 2-core machine were 10x slower)
FAST = ["--timestep_respacing", "10", "--skip_timesteps", "8", "--aug_num", "2", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 64x64 guided-diffusion UNet and a CLIP (tiny, random, real formats)."""
    d = tmp_path_factory.mktemp("bench_models")
    cfg = {k: v for k, v in tiny.UNET_64_CLASSES.items() if k != "num_classes"}
    return tiny.save_unet(d / "64x64_uncond.pt", cfg), tiny.save_clip(d / "ViT-B-16.pt", "torchscript")


def dino_state_dict(dim=128, depth=2, patch=8, grid=28, hidden=256, seed=0) -> dict:
    """Random weights under DINO's (timm's) ViT names: 2 heads of 64 channels."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + 1, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim, scale=0.2), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(hidden, dim), p + "mlp.fc1.bias": r(hidden),
                   p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)})
    return sd


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dino_tiny_pretrain.pth"
    torch.save(dino_state_dict(), path)
    return path


def rect_rle(top, left, height, width, side=512):
    """PIE-Bench's run-length pairs of a rectangle, written out row by row (independent of data.encode_rle)."""
    out = []
    for row in range(top, top + height):
        out += [row * side + left, width]
    return out


# (id, editing_type_id, original prompt, editing prompt, blended word, mask rectangle)
PIE_ITEMS = [("000000000001", "1", "a [cat] sitting on the grass", "a [dog] sitting on the grass", "cat dog",
              (100, 150, 120, 160)),
             ("000000000002", "2", "a cat on a sofa", "a cat wearing a [hat] on a sofa", "cat hat", (40, 200, 90, 110)),
             ("000000000003", "9", "a photo of a house", "a [watercolor painting] of a house", "", (0, 0, 512, 512))]


def write_pie(root: Path, items=PIE_ITEMS) -> Path:
    """PIE-Bench's published layout: data/mapping_file.json + data/annotation_images/<type folder>/<id>.jpg."""
    data_dir = root / "data"
    mapping = {}
    for n, (item_id, t, src, tgt, word, rect) in enumerate(items):
        rel = f"{t}_{'random' if t == '0' else 'edit'}_{n}/{item_id}.jpg"
        (data_dir / "annotation_images" / rel).parent.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:512, 0:512]
        arr = np.stack([xx // 2, yy // 2, (xx + yy) // 4 + 40 * n], -1) + np.random.default_rng(n).integers(0, 20, (512, 512, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(data_dir / "annotation_images" / rel, quality=95)
        mapping[item_id] = {"image_path": rel, "original_prompt": src, "editing_prompt": tgt,
                            "editing_instruction": f"make it {tgt}", "editing_type_id": t, "blended_word": word,
                            "mask": rect_rle(*rect)}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "mapping_file.json").write_text(json.dumps(mapping, indent=1))
    return data_dir


def write_manifest(root: Path, n=3, size=64, missing: int | None = None, fmt="jsonl") -> Path:
    """n small items (image, mask file, prompts); item ``missing`` names an image file that does not exist."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        arr = np.stack([xx * 3 + 20 * k, yy * 3, 255 - (xx + yy)], -1) + np.random.default_rng(k).integers(0, 25, (size, size, 3))
        img = f"img_{k}.png"
        if k != missing:
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / img)
        m = np.zeros((size, size), np.uint8)
        m[size // 4: size // 4 + size // 3 + 4 * k, size // 3: 2 * size // 3] = 255
        Image.fromarray(m).save(root / f"mask_{k}.png")
        rows.append({"id": f"item{k}", "image": img, "mask": f"mask_{k}.png", "prompt": f"a [red] ball number {k}",
                     "source_prompt": "a ball", "edit_type": str(1 + k % 2)})
    if fmt == "jsonl":
        path = root / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv
        path = root / "manifest.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def run_bench(args, capsys=None):
    rc = cli.main(["bench", *[str(a) for a in args]])
    return rc, (capsys.readouterr() if capsys else None)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines() if line.strip()]


# --- dataset --------------------------------------------------------------------------------------------------
def test_rle_decoding_against_a_hand_made_mask():
    # 5 x 6: runs (7, 3) = row 1, cols 1-3; (20, 2) = row 3, cols 2-3; (28, 10) runs past the end: cols 4-5 of row 4
    rle = [7, 3, 20, 2, 28, 10]
    expected = np.array([[0, 0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 1]], bool)
    assert (data.decode_rle(rle, (5, 6), border=False) == expected).all()
    framed = expected.copy()
    framed[0, :] = framed[-1, :] = framed[:, 0] = framed[:, -1] = True  # the reference decoder's border rule
    assert (data.decode_rle(rle, (5, 6)) == framed).all()
    # PIE-Bench's 512 x 512 masks: a hand-made rectangle, with and without the one-pixel frame
    m = data.decode_rle(rect_rle(100, 150, 120, 160), border=False)
    hand = np.zeros((512, 512), bool)
    hand[100:220, 150:310] = True
    assert (m == hand).all()
    assert data.decode_rle(rect_rle(100, 150, 120, 160)).sum() == hand.sum() + 4 * 511
    assert data.encode_rle(hand) == [v for r in range(100, 220) for v in (r * 512 + 150, 160)]
    with pytest.raises(data.DatasetError, match="odd number"):
        data.decode_rle([1, 2, 3], (5, 6))


def test_pie_bench_layout_and_manifests_load(tmp_path):
    items = data.load(write_pie(tmp_path))
    assert [it.id for it in items] == [i[0] for i in PIE_ITEMS]
    first = items[0]
    assert first.prompt == "a dog sitting on the grass" and first.source_prompt == "a cat sitting on the grass"
    assert first.edit_type == "1" and first.blended_word == "cat dog"
    assert Path(first.image).is_file() and first.image.startswith(str(tmp_path / "data" / "annotation_images"))
    job = data.make_job(first, ["blended"])
    assert job.error is None and job.image.shape == (512, 512, 3) and job.image.dtype == np.uint8
    assert job.edit_mask.sum() == 120 * 160 and not job.edit_mask[0].any()   # the methods: the annotation only
    assert job.eval_mask.sum() == 120 * 160 + 4 * 511 and job.eval_mask[0].all()  # the metrics: with the frame
    jsonl = data.load(write_manifest(tmp_path / "j"))
    csv_items = data.load(write_manifest(tmp_path / "c", fmt="csv"))
    assert [(i.id, i.prompt, i.source_prompt, i.edit_type) for i in jsonl] == \
           [(i.id, i.prompt, i.source_prompt, i.edit_type) for i in csv_items]
    assert jsonl[1].prompt == "a red ball number 1" and jsonl[1].mask_file.endswith("mask_1.png")
    job = data.make_job(jsonl[1], ["blended"])
    assert job.edit_mask.sum() == (64 // 3 + 4) * (2 * 64 // 3 - 64 // 3) and job.eval_mask is job.edit_mask
    missing = data.make_job(data.Item("x", str(tmp_path / "nope.png"), "p"), ["blended"])
    assert missing.image is None and "nope.png" in missing.error and "not found" in missing.error


# --- metrics --------------------------------------------------------------------------------------------------
def _pair(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    src = (torch.rand(1, 3, size, size, generator=g, dtype=torch.float64) * 0.6 + 0.2).mul(255).round().div(255)
    mask = torch.zeros(1, size, size)
    mask[:, :size // 4] = 1  # the top quarter is "edited"
    return src, mask


def test_background_metrics_identical_image():
    src, mask = _pair()
    bg = metrics.background(src, src, mask)
    assert bg["mse_unedit_part"] == [0.0] and bg["psnr_unedit_part"] == [math.inf]
    assert bg["lpips_unedit_part"] == [0.0] and bg["ssim_unedit_part"][0] == pytest.approx(1.0, abs=1e-6)
    # a result that differs only inside the mask is an identical background
    edited = src.clone()
    edited[..., :16, :] = 1 - edited[..., :16, :]
    assert metrics.background(edited, src, mask)["psnr_unedit_part"] == [math.inf]
    assert metrics.ssim(src, src)[0] == pytest.approx(1.0, abs=1e-6)


def test_background_metrics_of_a_known_constant_difference():
    src, mask = _pair()
    result = src + 0.1  # everywhere, so 3/4 of the pixels differ by 0.1 after masking
    bg = metrics.background(result, src, mask)
    mse = 0.1 ** 2 * 0.75  # PIE-Bench averages over the whole frame, masked pixels equal (0)
    assert bg["mse_unedit_part"][0] == pytest.approx(mse, rel=1e-9)
    # (torchmetrics takes ln 10 in float32: 7 digits)
    assert bg["psnr_unedit_part"][0] == pytest.approx(10 * math.log10(1 / mse), rel=1e-7)  # 21.249 dB
    assert bg["psnr_unedit_part"][0] == pytest.approx(21.2494, abs=1e-4)
    assert 0 < bg["ssim_unedit_part"][0] < 1 and bg["lpips_unedit_part"][0] > 0
    # the whole-image values without a mask: MSE 0.01, PSNR 20 dB
    assert float(metrics.mse(result, src)[0]) == pytest.approx(0.01, rel=1e-9)
    assert float(metrics.psnr(result, src)[0]) == pytest.approx(20.0, rel=1e-7)
    # a mask that leaves nothing unedited: PIE-Bench's "nan"
    full = metrics.background(result, src, torch.ones(1, 64, 64))
    assert all(math.isnan(v[0]) for v in full.values())


def test_clip_similarity_whole_and_edited_region(ckpt_dir):
    from blended_diffusion.models import load_clip
    clip = load_clip(str(ckpt_dir / "ViT-B-16.pt"))
    src, mask = _pair()
    whole = metrics.clip_similarity(clip, src, "a red ball")
    assert whole.shape == (1,) and 0 <= whole[0] <= 100
    full = metrics.clip_similarity(clip, src, "a red ball", torch.ones(1, 64, 64))
    assert torch.equal(full, whole)  # a full mask is the whole image
    black = metrics.clip_similarity(clip, torch.zeros_like(src), "a red ball")
    assert torch.equal(metrics.clip_similarity(clip, src, "a red ball", torch.zeros(1, 64, 64)), black)
    # 100 · max(cos, 0) of the unit embeddings
    emb = clip.encode_image(clip.preprocess(src.float() * 2 - 1))
    assert float(whole[0]) == pytest.approx(max(float((emb * clip.encode_text("a red ball")).sum()), 0) * 100, rel=1e-5)


def test_structure_distance_with_dino_weights(dino_file, ckpt_dir):
    from blended_diffusion.models.checkpoint import CheckpointError
    from blended_diffusion.models.dino import load_dino
    dino = load_dino(str(dino_file))
    src, _ = _pair(size=96)
    assert float(metrics.structure_distance(dino, src, src)[0]) == 0.0
    moved = torch.roll(src, 24, dims=-1)
    assert float(metrics.structure_distance(dino, moved, src)[0]) > 0
    x = torch.randn(1, 3, 224, 224)
    keys = dino.last_keys(x)
    assert keys.shape == (1, 1 + 28 * 28, 128)
    timm = pytest.importorskip("timm")  # open-clip-torch's dependency: the same ViT from timm gives the same keys
    from functools import partial
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
        num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_state_dict(dino_state_dict())
    seen = []
    ref.blocks[-1].attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        ref(x)
    assert torch.allclose(keys, seen[0][..., 128:256], atol=1e-5)
    with pytest.raises(CheckpointError, match="not a DINO ViT backbone"):
        load_dino(str(ckpt_dir / "clip_sd.pt"))


def test_pie_bench_metrics_of_an_identical_result(ckpt_dir, dino_file):
    from blended_diffusion.models import load_clip
    from blended_diffusion.models.dino import load_dino
    src, mask = _pair()
    row, = metrics.pie_bench(src, src, mask, load_clip(str(ckpt_dir / "ViT-B-16.pt")), "a ball",
                             load_dino(str(dino_file)))
    assert list(row) == list(metrics.PIE_COLUMNS)
    assert row["mse_unedit_part"] == 0 and row["psnr_unedit_part"] == math.inf and row["lpips_unedit_part"] == 0
    assert row["structure_distance"] == 0 and row["ssim_unedit_part"] == pytest.approx(1, abs=1e-6)


def test_evaluate_edit_and_the_fidelity_curve_measure_with_the_metrics_module(ckpt_dir):
    """One implementation: Evaluate Edit (apps.evaluate) and the fidelity curve (fidelity.measure) give the values of
    models/metrics.py's functions, and their LPIPS is the pack's one VGG model however the call names it."""
    from blended_diffusion.models import apps, fidelity, load_clip
    from blended_diffusion.models.guidance import lpips_model
    assert lpips_model() is lpips_model("vgg") and apps.clip_scores is metrics.clip_distance
    clip = load_clip(str(ckpt_dir / "ViT-B-16.pt"))
    src, mask = _pair()
    src = src.float()
    imgs = torch.cat([src, 1 - src])
    rows = apps.evaluate(imgs, src, mask, clip, "a dog")
    lp = metrics.lpips_distance(metrics.unedited(imgs, mask), metrics.unedited(src, mask).expand_as(imgs))
    assert [r["lpips_bg"] for r in rows] == lp.tolist() and rows[0]["lpips_bg"] == 0 and rows[0]["max_abs_bg"] == 0
    assert [r["clip_distance"] for r in rows] == metrics.clip_distance(clip, imgs, mask, "a dog").tolist()
    points = fidelity.measure(imgs, src, clip, "a dog", mask)
    assert [p[0] for p in points] == metrics.lpips_distance(imgs, src).tolist()
    assert [p[1] for p in points] == metrics.clip_distance(clip, imgs, mask, "a dog").tolist()


# --- the command, local -----------------------------------------------------------------------------------------
def test_bench_pie_layout_blended_end_to_end(tmp_path, models, dino_file, capsys):
    unet, clip = models
    data_dir = write_pie(tmp_path)
    out = tmp_path / "out"
    rc, cap = run_bench([data_dir, "--model", unet, "--clip", clip, *FAST, "--dino", dino_file,
                         "--output_path", out], capsys)
    assert rc == 0, cap.err
    rows = read_rows(out)
    assert [(r["id"], r["method"], r["edit_type"]) for r in rows] == [(i[0], "blended", i[1]) for i in PIE_ITEMS]
    for r, spec in zip(rows, PIE_ITEMS):
        assert r["error"] is None and r["seed"] == 404 and r["seconds"] > 0 and r["attempt"] == 1
        assert r["prompt"] == data.strip_brackets(spec[3]) and "[" not in r["prompt"]
        assert r["settings"]["skip_timesteps"] == 8 and r["settings"]["model"] == "64x64_uncond.pt"
        m = r["metrics"]
        assert 0 <= m["clip_similarity_target_image"] <= 100 and m["structure_distance"] >= 0
        result = np.asarray(Image.open(out / r["image"]))
        source = np.asarray(Image.open(tmp_path / "data" / "annotation_images" /
                                       json.loads((data_dir / "mapping_file.json").read_text())[r["id"]]["image_path"]))
        assert result.shape == source.shape == (512, 512, 3)
        if spec[0] != "000000000003":
            # Blended Diffusion keeps the background exactly: PIE-Bench's background metrics at their limits
            assert m["mse_unedit_part"] == 0 and m["psnr_unedit_part"] == math.inf
            assert m["lpips_unedit_part"] == 0 and m["ssim_unedit_part"] == pytest.approx(1, abs=1e-6)
            eval_mask = data.decode_rle(rect_rle(*spec[5]))
            assert (result[~eval_mask] == source[~eval_mask]).all()
            assert (result[eval_mask] != source[eval_mask]).any()
        else:  # a full mask: no unedited part, PIE-Bench's "nan" (null here)
            assert m["psnr_unedit_part"] is None and m["mse_unedit_part"] is None
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("method,edit_type,items,errors,structure_distance,psnr_unedit_part")
    assert [ln.split(",")[:4] for ln in lines[1:]] == [["blended", "1 change object", "1", "0"],
                                                      ["blended", "2 add object", "1", "0"],
                                                      ["blended", "9 change style", "1", "0"],
                                                      ["blended", "all", "3", "0"]]
    assert lines[-1].split(",")[5] == "inf"  # the mean background PSNR of exactly kept backgrounds
    md = (out / "summary.md").read_text()
    assert "| Blended Diffusion | 2 add object | 1 | 0 |" in md
    assert Image.open(out / "summary.png").size[0] >= 900
    record = json.loads((out / "bench.json").read_text())
    assert record["settings"]["blended"]["timestep_respacing"] == "10"
    assert "structure_distance is empty" not in cap.err


def test_resume_skips_finished_items_and_failures_are_recorded(tmp_path, models, capsys):
    unet, clip = models
    manifest = write_manifest(tmp_path / "ds", n=3, missing=1)
    out = tmp_path / "out"
    args = [manifest, "--model", unet, "--clip", clip, *FAST, "--output_path", out]
    rc, cap = run_bench(args, capsys)
    assert rc == 0, cap.err  # a failed item does not stop the run
    assert cap.err.count("structure_distance is empty") == 1  # said once, and the column stays empty
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["item0", "item1", "item2"]
    bad = rows[1]
    assert bad["error"] and "img_1.png" in bad["error"] and bad["metrics"] is None and bad["image"] is None
    assert all(r["error"] is None and r["metrics"]["structure_distance"] is None for r in (rows[0], rows[2]))
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[-1].split(",")[:4] == ["blended", "all", "2", "1"]
    images = {r["id"]: (out / r["image"]).stat().st_mtime_ns for r in rows if r["image"]}

    # the same command again: the finished items are skipped (no new row, images untouched), the failed one retried
    rc, cap = run_bench(args, capsys)
    assert rc == 0
    again = read_rows(out)
    assert again[:3] == rows and [r["id"] for r in again[3:]] == ["item1"] and again[3]["error"]
    assert {r["id"]: (out / r["image"]).stat().st_mtime_ns for r in rows if r["image"]} == images

    # the missing file appears; a row lost (e.g. a crash while writing it) is redone; a cut line is ignored
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 3, yy * 3, xx + yy], -1).astype(np.uint8)).save(tmp_path / "ds" / "img_1.png")
    lines = (out / RESULTS).read_text().splitlines()
    (out / RESULTS).write_text("\n".join(line for line in lines if '"item2"' not in line) + '\n{"id": "item2", "met')
    rc, cap = run_bench(args, capsys)
    assert rc == 0
    final = report.latest(read_rows_lenient(out))
    assert sorted((r["id"], r["error"] is None) for r in final) == [("item0", True), ("item1", True), ("item2", True)]
    redone = [r for r in read_rows_lenient(out) if r["id"] == "item2"]
    assert len(redone) == 1 and redone[0]["metrics"] == rows[2]["metrics"]  # same seed, same result
    assert "not a complete row" in cap.err
    assert (out / "summary.csv").read_text().splitlines()[-1].split(",")[:4] == ["blended", "all", "3", "0"]


def read_rows_lenient(out: Path) -> list[dict]:
    rows = []
    for line in (out / RESULTS).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_changed_settings_are_refused_and_errors_are_clear(tmp_path, models, monkeypatch, capsys):
    unet, clip = models
    manifest = write_manifest(tmp_path / "ds", n=1)
    out = tmp_path / "out"
    rc, cap = run_bench([manifest, "--model", unet, "--clip", clip, *FAST, "--output_path", out], capsys)
    assert rc == 0, cap.err
    rc, cap = run_bench([manifest, "--model", unet, "--clip", clip, *FAST, "--skip_timesteps", "7",
                         "--output_path", out], capsys)
    assert rc == 1 and "other settings (skip_timesteps)" in cap.err
    for argv, message in [
        ([tmp_path / "nothing_here"], "dataset not found"),
        ([manifest, "--methods", "blended,magic"], "--methods"),
        ([manifest, "--methods", "p2p"], "--sd-checkpoint"),
        ([manifest, "--ray-cpus", "2"], "--ray"),
        ([manifest, "--dino", tmp_path / "no_dino.pth"], "file not found"),
    ]:
        rc, cap = run_bench([*argv, "--output_path", tmp_path / "never"], capsys)
        assert rc == 1 and message in cap.err, (argv, cap.err)
    assert not (tmp_path / "never").exists()
    # Ray is an optional extra: without it, one error line saying how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    rc, cap = run_bench([manifest, "--ray", "local", "--output_path", tmp_path / "never"], capsys)
    err = [line for line in cap.err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1 and err[0].startswith("error:")
    assert 'pip install "blended-diffusion[ray]"' in err[0]


def test_benchmark_script_smoke(tmp_path):
    """tests/benchmark_bench.py runs (the local runner only here; no timing is asserted)."""
    import benchmark_bench
    res, = benchmark_bench.main(["--items", "3", "--size", "64", "--skip", "8", "--views", "2", "--runners", "local",
                                 "--work-dir", str(tmp_path)])
    assert res["items"] == 3 and res["workers"] == 1 and res["s_per_item"] > 0 and res["edit_s"] > 0


# --- Ray ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_case(tmp_path_factory, models):
    """A 4-item manifest and its rows from the local runner (one thread, as each Ray CPU worker has)."""
    unet, clip = models
    d = tmp_path_factory.mktemp("ray_case")
    manifest = write_manifest(d / "ds", n=4)
    args = [manifest, "--model", unet, "--clip", clip, *FAST]
    assert cli.main(["bench", *map(str, args), "--output_path", str(d / "local")]) == 0
    return args, {(r["id"], r["method"]): r for r in read_rows(d / "local")}, d / "local"


def _same_rows(rows: list[dict], out: Path, local: dict, local_dir: Path):
    assert sorted((r["id"], r["method"]) for r in rows) == sorted(local)
    for r in rows:
        ref = local[(r["id"], r["method"])]
        assert r["error"] is None and r["seed"] == ref["seed"] and r["settings"] == ref["settings"]
        assert r["metrics"].keys() == ref["metrics"].keys()
        for k, v in r["metrics"].items():
            assert v == ref["metrics"][k] if v is None or ref["metrics"][k] is None else \
                v == pytest.approx(ref["metrics"][k], rel=1e-5, abs=1e-6), k
        assert np.array_equal(np.asarray(Image.open(out / r["image"])), np.asarray(Image.open(local_dir / ref["image"])))


def test_ray_two_cpu_workers_give_the_local_rows_and_a_killed_worker_loses_nothing(tmp_path, ray_case):
    """A real Ray cluster (``--ray local --ray-cpus 2``), driven from the pack copied to
    custom_nodes/comfyui-blended-diffusion (no Python name) in its own process: the workers import the pack by
    path. The worker running item2 dies (os._exit) on its first run: the item is redone on a worker, the other
    items are not lost, and every row (metrics, seed, settings, image) equals the local runner's."""
    pytest.importorskip("ray")
    args, local, local_dir = ray_case
    pack = tmp_path / "ComfyUI" / "custom_nodes" / "comfyui-blended-diffusion"
    shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", ".pytest_cache",
                                                              "output", "*.egg-info"))
    out = tmp_path / "ray"
    script = ("import sys; sys.path.insert(0, 'tests'); from pack import load_pack; load_pack(); "
              "from blended_diffusion import cli; sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, CRASH_ENV: "item2", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script, "bench", *map(str, args), "--ray", "local", "--ray-cpus", "2",
                           "--output_path", str(out)], cwd=pack, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 worker death(s), 1 item(s) re-run" in proc.stdout
    assert "Ray worker 2 died while running item item2" in proc.stderr
    rows = read_rows(out)
    _same_rows(rows, out, local, local_dir)
    assert {r["id"]: r["attempt"] for r in rows} == {"item0": 1, "item1": 1, "item2": 2, "item3": 1}
    assert {r["worker"].split(" (")[0] for r in rows} == {"ray worker 1", "ray worker 2"}  # two actors worked
    assert (out / "summary.csv").read_text().splitlines()[-1].split(",")[:4] == ["blended", "all", "4", "0"]


# --- Stable Diffusion methods (ComfyUI) ---------------------------------------------------------------------------
COMFY = os.environ.get("COMFYUI_PATH", "")


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory):
    if not COMFY or not (Path(COMFY) / "comfy" / "sd.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout (and use its Python) to run the SD methods of bench")
    try:
        import tiny_sd
        return tiny_sd.write_sd15_checkpoint(tmp_path_factory.mktemp("sd") / "tiny_sd15.safetensors")
    except ImportError as e:
        pytest.skip(f"ComfyUI at {COMFY} does not import here ({e}): run with its interpreter")


def test_bench_sd_methods_with_comfyui(tmp_path, sd_checkpoint, models, capsys):
    unet, clip = models
    manifest = write_manifest(tmp_path / "ds", n=2)
    out = tmp_path / "out"
    methods = ["blended", "p2p", "sdedit", "sdedit-plain"]
    rc, cap = run_bench([manifest, "--methods", ",".join(methods), "--model", unet, "--clip", clip, *FAST,
                         "--sd-checkpoint", sd_checkpoint, "--comfyui", COMFY, "--steps", 4, "--inner-steps", 2,
                         "--t0", 0.5, "--output_path", out], capsys)
    assert rc == 0, cap.err
    rows = read_rows(out)
    assert [(r["id"], r["method"]) for r in rows] == [(f"item{k}", m) for k in range(2) for m in methods]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert np.asarray(Image.open(out / r["image"])).shape == (64, 64, 3)
        assert all(v is None or math.isfinite(v) or v == math.inf for v in r["metrics"].values())
        if r["method"] != "blended":
            assert r["settings"]["steps"] == 4 and r["settings"]["checkpoint"] == Path(sd_checkpoint).name
            assert r["inversion_seconds"] > 0 and r["metrics"]["psnr_unedit_part"] < math.inf
    for k in range(2):  # one inversion per item serves its three SD methods
        assert len({r["inversion_seconds"] for r in rows if r["id"] == f"item{k}" and r["method"] != "blended"}) == 1
    summary = (out / "summary.csv").read_text()
    for m in methods:
        assert f"\n{m},all,2,0," in summary
