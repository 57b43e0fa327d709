"""Reliability (issue 6): every bad input gets a clear answer, nothing is lost, and the next good
input still works with the same loaded models.

Inputs go through the nodes as ComfyUI calls them (inside ``torch.inference_mode()``, IMAGE
[B, H, W, C], MASK [B, H, W]) and, where it applies, through the command line (``cli.main``) with
tiny checkpoints given by path. Cases already covered elsewhere are referenced, not repeated
(tests/test_nodes.py, tests/test_engine.py, tests/test_cli.py, tests/test_weights.py)."""
import functools
import hashlib
import http.server
import importlib
import json
import threading
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tiny
from blended_diffusion import cli, host
from blended_diffusion.models import CheckpointError
from blended_diffusion.models import weights as W
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS as N
from blended_diffusion.nodes import loaders

BLENDED_NODES = ("LoadDDPM", "LoadCLIP", "NoiseImage", "CLIPGuidedStep", "MaskBlend", "ExtendingAugment",
                 "BlendedDiffusionSampler", "RankByCLIP", "Extrapolate", "BlendedDiffusionEvaluate")
edit_module = importlib.import_module("blended_diffusion.models.edit")  # the module, not models.edit()
DDPM_FILE = "64x64_classes.pt"  # the cheapest tiny model (64 px, class-conditional)
CLI_FAST = ["--timestep_respacing", "10", "--skip_timesteps", "9", "--aug_num", "2", "--batch_size", "1",
            "--iterations_num", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _RunsCode:
    """Unpickling this creates the file it names (safe loading must never do it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(ckpt_dir, tmp_path_factory):
    """$BLENDED_DIFFUSION_MODELS with good files and every kind of bad one."""
    root = tmp_path_factory.mktemp("models")
    dd, cd = root / "ddpm", root / "clip_guidance"
    dd.mkdir()
    cd.mkdir()
    good_unet = (ckpt_dir / DDPM_FILE).read_bytes()
    (dd / DDPM_FILE).write_bytes(good_unet)
    tiny.save_unet(dd / "other.pt", tiny.UNET_64_CLASSES, seed=1)          # a second, different model
    (cd / "ViT-B-16.pt").write_bytes((ckpt_dir / "ViT-B-16.pt").read_bytes())
    tiny.save_clip(cd / "other_clip.safetensors", "safetensors", seed=1)
    from safetensors.torch import save_file
    for d in (dd, cd):
        (d / "empty.pt").write_bytes(b"")
        torch.save({"x": _RunsCode(root / "pwned")}, d / "evil.pt")
    (dd / "truncated.pt").write_bytes(good_unet[:len(good_unet) // 3])
    (dd / "corrupt.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(100))
    (dd / "clip.pt").write_bytes((ckpt_dir / "clip_sd.pt").read_bytes())
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)},
              str(dd / "sd15.safetensors"))
    tiny.save_unet(dd / "odd_unet.pt", dict(image_size=32, in_channels=3, model_channels=32, out_channels=6,
                                            num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2),
                                            num_head_channels=64))
    (cd / "unet.pt").write_bytes(good_unet)
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)},
              str(cd / "clip_l.safetensors"))
    odd_clip = tiny.tiny_clip().state_dict()
    del odd_clip["positional_embedding"]
    torch.save(odd_clip, cd / "odd_clip.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLENDED_DIFFUSION_MODELS", str(root))
        loaders.clear_cache()
        yield root
        loaders.clear_cache()


@pytest.fixture(scope="module")
def models(files):
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load(DDPM_FILE, "10", "fp32")[0]
        clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
    return ddpm, clip


def ramp(h, w, b=1):
    """A smooth 8-bit IMAGE [b, h, w, 3]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2], -1) * 0.8 + 0.1
    return ((img * 255).round() / 255)[None].repeat(b, 1, 1, 1)


def box_mask(h, w, top, left, bh, bw):
    m = torch.zeros(1, h, w)
    m[:, top:top + bh, left:left + bw] = 1
    return m


IMAGE, MASK = ramp(40, 48), box_mask(40, 48, 10, 14, 16, 20)


def node_edit(models, image, mask, prompt="a red ball", *, batch=1, skip=8, seed=404, views=2, feather=0,
              invert=False, blend=True, clip_lambda=1000.0, ddpm=None, clip=None):
    """NoiseImage → ExtendingAugment → CLIPGuidedStep → MaskBlend → BlendedDiffusionSampler, as ComfyUI runs them."""
    ddpm = ddpm or models[0]
    clip = clip or models[1]
    with torch.inference_mode():
        noise, _ = N["NoiseImage"]().noise(image, ddpm, skip_timesteps=skip, noise_seed=3)
        aug, _ = N["ExtendingAugment"]().settings(num_views=views)
        step = N["CLIPGuidedStep"]().step(ddpm, prompt, clip_lambda=clip_lambda, augment=aug,
                                          clip=clip if prompt.strip() else None)[0]
        kw = dict(seed=seed, batch_size=batch, sampler="DDPM", class_label=0)
        if blend:
            rule, _ = N["MaskBlend"]().blend(mask, invert=invert, feather=feather)
            return N["BlendedDiffusionSampler"]().sample(noise, step, blend=rule, **kw)[0]
        return N["BlendedDiffusionSampler"]().sample(noise, step, mask=mask, **kw)[0]


@pytest.fixture(scope="module")
def reference(models):
    """The good input's result; every test ends by getting it again, bit for bit, from the same models."""
    out = node_edit(models, IMAGE, MASK)
    assert_background_kept(out, IMAGE, MASK)
    return out


def still_works(models, reference):
    assert torch.equal(node_edit(models, IMAGE, MASK), reference)


def assert_background_kept(out, image, mask, changed=True):
    keep = (mask == 0).expand(out.shape[0], -1, -1) if mask.shape[0] == 1 else mask == 0
    src = image.expand(out.shape[0], -1, -1, -1) if image.shape[0] == 1 else image
    assert torch.equal(out[keep], src[keep])
    if changed:
        assert (out[~keep] - src[~keep]).abs().max() > 0.01


def save_png(path, image, mode="RGB"):
    arr = (image[0].numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    if mode == "L":
        im = im.convert("L")
    elif mode == "RGBA":
        im = Image.fromarray(np.concatenate([arr, np.full_like(arr[..., :1], 200)], -1), "RGBA")
    im.save(path)
    return path


def save_mask(path, mask):
    Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(path)
    return path


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr()


@pytest.fixture
def photo(tmp_path):
    return save_png(tmp_path / "photo.png", IMAGE), save_mask(tmp_path / "mask.png", MASK)


def cli_edit(ckpt_dir, out, *argv, model=None):
    return ["edit", "--model", model or ckpt_dir / DDPM_FILE, "--clip", ckpt_dir / "ViT-B-16.pt", *CLI_FAST,
            "--output_path", out, *argv]


def cli_result(out):
    return np.asarray(Image.open(out / "output_i_0_b_0.png"))


# --- images ----------------------------------------------------------------------------------------
def test_tiny_images_are_worked_at_model_size(models, reference, ckpt_dir, tmp_path, capsys):
    for h, w in [(16, 16), (3, 5)]:
        img, mask = ramp(h, w), box_mask(h, w, h // 4, w // 4, max(1, h // 2), max(1, w // 2))
        out = node_edit(models, img, mask)
        assert out.shape == (1, h, w, 3)
        assert_background_kept(out, img, mask)
    img, mask = ramp(16, 16), box_mask(16, 16, 4, 4, 8, 8)
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "a cat", "-i", save_png(tmp_path / "s.png", img),
                               "--mask", save_mask(tmp_path / "m.png", mask)), capsys)
    assert rc == 0, cap.err
    res, src = cli_result(tmp_path / "o"), np.asarray(Image.open(tmp_path / "s.png"))
    assert res.shape == (16, 16, 3) and np.array_equal(res[mask[0] == 0], src[mask[0] == 0])
    still_works(models, reference)


def test_4096_image_only_the_crop_around_the_mask_is_processed(models, reference, monkeypatch):
    previews = []

    class Recording(host.Progress):
        def update(self, step, preview=None, total=None):
            previews.append(tuple(preview.shape))
            super().update(step, preview, total)

    monkeypatch.setattr(host, "progress", Recording)
    side = 4096
    img = (torch.linspace(0, 1, side)[:, None, None] * 0.5 + torch.linspace(0, 1, side)[None, :, None] * 0.4
           + torch.tensor([0.05, 0.1, 0.0])).mul(255).round().div(255)[None]
    mask = box_mask(side, side, 2000, 3000, 40, 30)
    out = node_edit(models, img, mask)
    assert out.shape == (1, side, side, 3)
    changed = (out != img).any(-1)
    assert not (changed & (mask == 0)).any()      # outside the mask: the same values, bit for bit
    assert changed[mask > 0].any()
    assert previews == [(1, 3, 64, 64)] * 2       # every step ran on the 64 px crop only
    del img, out, changed
    monkeypatch.undo()
    still_works(models, reference)


def test_grayscale_rgba_and_odd_channel_counts(models, reference, ckpt_dir, tmp_path, capsys):
    gray = IMAGE.mean(-1, keepdim=True)
    out_gray = node_edit(models, gray, MASK)
    assert out_gray.shape == (1, 40, 48, 3)
    assert torch.equal(out_gray, node_edit(models, gray.expand(-1, -1, -1, 3), MASK))  # gray = gray RGB
    gray_alpha = torch.cat([gray, torch.rand_like(gray)], -1)                          # LA images
    assert torch.equal(node_edit(models, gray_alpha, MASK), out_gray)
    rgba = torch.cat([IMAGE, torch.rand_like(IMAGE[..., :1])], -1)
    assert torch.equal(node_edit(models, rgba, MASK), reference)  # alpha ignored: the MASK is the region
    with pytest.raises(ValueError, match="C = 1, 3 or 4 channels"), torch.inference_mode():
        N["NoiseImage"]().noise(torch.rand(1, 40, 48, 5), models[0], skip_timesteps=8)
    # the command line reads grayscale and RGBA files as RGB (with --mask, the file's alpha is not used)
    results = {}
    for mode in ("RGB", "L", "RGBA"):
        out = tmp_path / mode
        rc, cap = run_cli(cli_edit(ckpt_dir, out, "-p", "a cat", "-i", save_png(tmp_path / f"{mode}.png", IMAGE, mode),
                                   "--mask", save_mask(tmp_path / "m.png", MASK)), capsys)
        assert rc == 0, cap.err
        results[mode] = cli_result(out)
        assert results[mode].shape == (40, 48, 3)
    assert np.array_equal(results["RGBA"], results["RGB"]) and not np.array_equal(results["L"], results["RGB"])
    still_works(models, reference)


def test_batches_one_mask_one_per_image_or_a_wrong_count(models, reference):
    images = torch.cat([IMAGE, IMAGE.flip(2)])
    shared = node_edit(models, images, MASK, batch=2)
    assert shared.shape == (4, 40, 48, 3)
    assert torch.allclose(shared[0], reference[0], atol=1e-4)  # result (image 0, 0) does not depend on the batch
    assert_background_kept(shared, images.repeat_interleave(2, 0), MASK)
    own = torch.cat([MASK, box_mask(40, 48, 2, 2, 10, 10)])
    per_image = node_edit(models, images, own)
    assert per_image.shape == (2, 40, 48, 3)
    assert_background_kept(per_image, images, own)
    with pytest.raises(ValueError, match="3 masks for 2 images: give one mask, or one per image"):
        node_edit(models, images, torch.cat([own, MASK]))
    still_works(models, reference)


def test_nan_infinite_and_out_of_range_values(models, reference, caplog):
    for bad in (float("nan"), float("inf")):
        img = IMAGE.clone()
        img[0, 5, 5, 1] = bad
        with pytest.raises(ValueError, match="NoiseImage: the image contains NaN or infinite values"):
            node_edit(models, img, MASK)
    loud = IMAGE * 1.6 - 0.3                               # [-0.14, 1.14]: clamped with a warning
    out = node_edit(models, loud, MASK)
    assert "outside 0..1: clamped" in caplog.text
    assert torch.equal(out, node_edit(models, loud.clamp(0, 1), MASK))
    holey = MASK.clone()
    holey[MASK == 0] = float("nan")                         # NaN in a mask counts as 0 (kept)
    assert torch.equal(node_edit(models, IMAGE, holey), reference)
    assert "NaN counts as 0" in caplog.text
    still_works(models, reference)


# --- masks -----------------------------------------------------------------------------------------
def test_mask_of_another_size_is_resized_with_a_warning(models, reference, caplog, ckpt_dir, tmp_path, capsys):
    small = box_mask(20, 36, 5, 10, 8, 15)                 # another size and aspect ratio
    out = node_edit(models, IMAGE, small)
    assert "mask is 36x20 but the image is 48x40: mask resized to the image" in caplog.text
    resized = F.interpolate(small[:, None], size=(40, 48), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(out, node_edit(models, IMAGE, resized))
    assert_background_kept(out, IMAGE, resized)
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "a cat", "-i", save_png(tmp_path / "s.png", IMAGE),
                               "--mask", save_mask(tmp_path / "m.png", small)), capsys)
    assert rc == 0 and "another aspect ratio" in cap.err and "stretched" in cap.err
    still_works(models, reference)


def test_empty_mask_gives_the_input_back_with_warnings(models, reference, caplog):
    """(The command line refuses an empty mask file instead: test_cli.py::test_edit_errors_are_clear.)"""
    empty = torch.zeros(1, 40, 48)
    out = node_edit(models, IMAGE, empty, batch=2)
    assert torch.equal(out, IMAGE.expand(2, -1, -1, -1))
    assert "MaskBlend: the mask is empty" in caplog.text and "the mask is empty, the image comes back unchanged" in caplog.text
    assert torch.equal(node_edit(models, IMAGE, empty, blend=False), IMAGE)   # Algorithm 1 too
    assert torch.equal(node_edit(models, IMAGE, torch.ones(1, 40, 48), invert=True), IMAGE)
    still_works(models, reference)


def test_full_mask_edits_the_whole_image(models, reference):
    full = node_edit(models, IMAGE, torch.ones(1, 40, 48))
    assert full.shape == IMAGE.shape and (full != IMAGE).any(-1).float().mean() > 0.9
    assert torch.equal(node_edit(models, IMAGE, torch.zeros(1, 40, 48), invert=True), full)
    still_works(models, reference)


def test_soft_feathered_mask_fades_the_edit(models, reference):
    with torch.inference_mode():
        _, soft = N["MaskBlend"]().blend(MASK, feather=4)
    out = node_edit(models, IMAGE, MASK, feather=4)
    change = (out - IMAGE).abs().amax(-1)[0]
    m = soft[0]
    assert ((m > 0) & (m < 1)).sum() > 50
    assert torch.all(change <= m + 1e-6)                   # a pixel changes at most by its mask value
    assert torch.equal(out[0][m == 0], IMAGE[0][m == 0])   # exact where the mask is 0
    assert (change[(m > 0) & (m < 0.5)] > 0).any()         # the edit fades into the soft edge
    assert not torch.equal(out, reference)
    still_works(models, reference)
    # core LoadImage's MASK (1 where alpha is 0): test_nodes.py::test_sampler_keeps_background_exactly_and_edits_the_painted_region
    # and, for mask files, test_cli.py::test_mask_files


# --- prompts ---------------------------------------------------------------------------------------
def test_long_prompt_is_truncated_with_a_warning(models, reference, caplog, ckpt_dir, tmp_path, capsys):
    clip = models[1]
    long = "a photo of a dog " * 30
    out = node_edit(models, IMAGE, MASK, prompt=long)
    assert "CLIP reads 77: truncated" in caplog.text
    assert_background_kept(out, IMAGE, MASK)
    with torch.inference_mode():  # what CLIP reads is the first 75 tokens: more words change nothing
        assert torch.equal(clip.encode_text("dog " * 100), clip.encode_text("dog " * 90))
        assert not torch.equal(clip.encode_text("dog " * 100), clip.encode_text("dog " * 20))
    img, mask = save_png(tmp_path / "s.png", IMAGE), save_mask(tmp_path / "m.png", MASK)
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", long, "-i", img, "--mask", mask), capsys)
    assert rc == 0 and "truncated" in cap.err
    still_works(models, reference)


def test_empty_and_non_ascii_prompts(models, reference, ckpt_dir, tmp_path, capsys):
    """(Removal through the nodes: test_nodes.py::test_empty_prompt_without_clip_algorithm1_ddim_and_fixed_noise.)"""
    clip = models[1]
    prompts = ["un chien très mignon 🐶", "一只狗"]
    outs = [node_edit(models, IMAGE, MASK, prompt=p) for p in prompts]
    for out in outs:
        assert_background_kept(out, IMAGE, MASK)
    with torch.inference_mode():
        embs = [clip.encode_text(p) for p in [*prompts, "", "a dog"]]
    assert all(not torch.equal(a, b) for i, a in enumerate(embs) for b in embs[i + 1:])  # read, not dropped
    img, mask = save_png(tmp_path / "s.png", IMAGE), save_mask(tmp_path / "m.png", MASK)
    for i, p in enumerate([*prompts, ""]):
        out = tmp_path / f"o{i}"
        rc, cap = run_cli(cli_edit(ckpt_dir, out, "-p", p, "-i", img, "--mask", mask), capsys)
        assert rc == 0, cap.err
        rec = json.loads((out / "output.json").read_text())
        assert rec["parameters"]["prompt"] == p and (out / "output_sheet.png").is_file()
        assert (rec["resolved"]["clip"] is None) == (p == "")  # empty: no CLIP, no score (removal)
        assert (rec["results"][0]["score"] is None) == (p == "")
    still_works(models, reference)


# --- numbers ---------------------------------------------------------------------------------------
def test_numeric_inputs_declare_and_enforce_their_ranges(models, reference):
    """Every INT/FLOAT input has min/max for ComfyUI's own check, and the node enforces the same range
    when it is called directly (standalone runner, scripts)."""
    for cls in (N[name] for name in BLENDED_NODES):
        for section in ("required", "optional"):
            for name, entry in cls.INPUT_TYPES().get(section, {}).items():
                if entry[0] in ("INT", "FLOAT"):
                    assert "min" in entry[1] and "max" in entry[1], f"{cls.__name__}.{name}"
    ddpm, clip = models
    cases = [
        (lambda: N["CLIPGuidedStep"]().step(ddpm, "a dog", clip_lambda=-1.0, clip=clip),
         "clip_lambda = -1.0 is outside the allowed range 0.0..100000.0"),
        (lambda: N["CLIPGuidedStep"]().step(ddpm, "a dog", clip_lambda=1e6, clip=clip), "0.0..100000.0"),
        (lambda: N["CLIPGuidedStep"]().step(ddpm, "a dog", range_lambda=float("nan"), clip=clip), "range_lambda"),
        (lambda: N["CLIPGuidedStep"]().step(ddpm, "", l2_lambda=-5.0), "l2_lambda = -5.0"),
        (lambda: N["ExtendingAugment"]().settings(num_views=0), "num_views = 0 is outside the allowed range 1..64"),
        (lambda: N["MaskBlend"]().blend(MASK, feather=-1), "feather = -1"),
        (lambda: N["NoiseImage"]().noise(IMAGE, ddpm, skip_timesteps=1000), "skip_timesteps = 1000 .* 0..999"),
        (lambda: N["NoiseImage"]().noise(IMAGE, ddpm, strength=1.5), "strength = 1.5"),
        (lambda: N["Extrapolate"]().extrapolate(IMAGE, ddpm, num_views=0, extend_right=True), "num_views = 0"),
        (lambda: N["RankByCLIP"]().rank(IMAGE, clip, "a dog", top_k=-1), "top_k = -1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message), torch.inference_mode():
            call()
    noise, _ = N["NoiseImage"]().noise(IMAGE, ddpm, skip_timesteps=8)
    step = N["CLIPGuidedStep"]().step(ddpm, "")[0]
    for batch in (0, 65):
        with pytest.raises(ValueError, match=f"batch_size = {batch} is outside the allowed range 1..64"):
            N["BlendedDiffusionSampler"]().sample(noise, step, batch_size=batch)
    still_works(models, reference)


def test_skip_timesteps_at_or_past_the_steps_runs_one_step(models, reference, caplog):
    """(The command line and the engine refuse it: test_cli.py::test_edit_errors_are_clear,
    test_engine.py::test_bad_numbers_are_rejected.)"""
    with torch.inference_mode():
        state, _ = N["NoiseImage"]().noise(IMAGE, models[0], skip_timesteps=10)
    assert state.skip_timesteps == 9 and "skip_timesteps 10 is outside 0..9 for 10 steps: using 9" in caplog.text
    assert_background_kept(node_edit(models, IMAGE, MASK, skip=10), IMAGE, MASK, changed=False)
    still_works(models, reference)


def test_zero_steps_is_refused(models, reference, ckpt_dir, tmp_path, photo, capsys):
    for respacing in ("0", "-3", "0,0"):
        with pytest.raises(ValueError, match=f"respacing '{respacing}' keeps no denoising step"), \
                torch.inference_mode():
            N["LoadDDPM"]().load(DDPM_FILE, respacing, "fp32")
    with pytest.raises(ValueError, match="'ddim0' is not valid"):
        N["LoadDDPM"]().load(DDPM_FILE, "ddim0", "fp32")
    img, mask = photo
    for respacing in ("0", "-3"):
        argv = cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask,
                        "--timestep_respacing", respacing, "--skip_timesteps", "0")
        rc, cap = run_cli(argv, capsys)
        assert rc == 1 and f"--timestep_respacing '{respacing}' keeps no denoising step" in cap.err
    still_works(models, reference)


def test_guidance_weight_at_the_bounds_and_off(models, reference, ckpt_dir, tmp_path, photo, capsys):
    """λ at its maximum still gives finite images with the background kept; λ = 0 is no guidance
    (the same result as an empty prompt). The CLI refuses negative weights and reports overflow."""
    strong = node_edit(models, IMAGE, MASK, clip_lambda=100000.0)
    assert torch.isfinite(strong).all() and strong.min() >= 0 and strong.max() <= 1
    assert_background_kept(strong, IMAGE, MASK)
    assert torch.equal(node_edit(models, IMAGE, MASK, clip_lambda=0.0), node_edit(models, IMAGE, MASK, prompt=""))
    img, mask = photo
    for flag, value, message in [("--clip_guidance_lambda", "-1", "--clip_guidance_lambda = -1.0: it must be"),
                                 ("--range_lambda", "nan", "--range_lambda = nan"),
                                 ("--l2_sim_lambda", "-3", "--l2_sim_lambda = -3.0"),
                                 ("--clip_guidance_lambda", "1e40", "NaN or infinite values")]:
        rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask, flag, value,
                                   "--skip_timesteps", "8"), capsys)  # 2 steps: the 2nd x̂0 sees the 1st gradient
        assert rc == 1 and message in cap.err, cap.err
    rc, cap = run_cli(["extrapolate", "-i", img, "--right", "x", "--clip_guidance_lambda", "-2"], capsys)
    assert rc == 1 and "--clip_guidance_lambda = -2.0" in cap.err
    still_works(models, reference)


def test_zero_views_is_refused_on_the_command_line(ckpt_dir, tmp_path, photo, capsys):
    """(Through the nodes: test_numeric_inputs_declare_and_enforce_their_ranges.)"""
    img, mask = photo
    for argv in (cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask, "--aug_num", "0"),
                 ["extrapolate", "-i", img, "--right", "x", "--aug_num", "0"]):
        rc, cap = run_cli(argv, capsys)
        assert rc == 1 and "--aug_num = 0: it must be at least 1" in cap.err
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask), capsys)
    assert rc == 0, cap.err


def test_extrapolation_amount_zero_or_eight_times_the_width(models, reference, ckpt_dir, tmp_path, capsys):
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load(DDPM_FILE, "5", "fp32")[0]  # same weights, 5 steps
        for amount in (0.0, 8.5):
            with pytest.raises(ValueError, match=f"amount = {amount} is outside the allowed range 0.05..8.0"):
                N["Extrapolate"]().extrapolate(IMAGE, ddpm, amount=amount, extend_right=True)
        narrow = ramp(64, 10)                              # at the model's height: no resampling
        out = N["Extrapolate"]().extrapolate(narrow, ddpm, amount=8.0, seed=1, extend_left=False,
                                             extend_right=True, num_views=1)[0]
    assert out.shape == (1, 64, 10 + 80, 3)
    assert torch.allclose(out[:, :, :10], narrow, atol=1e-5) and torch.isfinite(out).all()
    img = save_png(tmp_path / "s.png", IMAGE)
    for amount, message in (("0", "amount = 0.0"), ("20", "amount = 20.0")):
        rc, cap = run_cli(["extrapolate", "-i", img, "--right", "", "--amount", amount, "--model",
                           ckpt_dir / DDPM_FILE, "--timestep_respacing", "5", "--device", "cpu"], capsys)
        assert rc == 1 and message in cap.err and "(0, 8]" in cap.err
    still_works(models, reference)


# --- files -----------------------------------------------------------------------------------------
BAD_FILES = [  # (loader, file, what the message must say besides the file's name)
    ("LoadDDPM", "missing.pt", ["is not in", "ddpm", "put the file there"]),
    ("LoadDDPM", "empty.pt", ["the file is empty", "guided-diffusion UNet checkpoint"]),
    ("LoadDDPM", "truncated.pt", ["truncated or corrupt", "guided-diffusion UNet checkpoint"]),
    ("LoadDDPM", "corrupt.safetensors", ["truncated or corrupt", "guided-diffusion UNet checkpoint"]),
    ("LoadDDPM", "clip.pt", ["a CLIP model", "for LoadCLIP", "not a guided-diffusion UNet"]),
    ("LoadDDPM", "sd15.safetensors", ["a Stable Diffusion checkpoint", "not a guided-diffusion UNet"]),
    ("LoadDDPM", "odd_unet.pt", ["unknown architecture", "channel_mult (1, 2)", "256x256_diffusion_uncond.pt"]),
    ("LoadCLIP", "missing.pt", ["is not in", "clip_guidance"]),
    ("LoadCLIP", "empty.pt", ["the file is empty", "OpenAI CLIP checkpoint"]),
    ("LoadCLIP", "unet.pt", ["a guided-diffusion UNet", "for LoadDDPM", "not an OpenAI-format CLIP"]),
    ("LoadCLIP", "clip_l.safetensors", ["Hugging Face transformers CLIP", "ViT-B-16.pt"]),
    ("LoadCLIP", "odd_clip.pt", ["unknown CLIP architecture", "missing tensor 'positional_embedding'",
                                 "expected an OpenAI-format CLIP"]),
]


@pytest.mark.parametrize("loader,name,parts", BAD_FILES, ids=[f"{a}-{b}" for a, b, _ in BAD_FILES])
def test_bad_model_files_name_the_file_and_what_was_expected(models, loader, name, parts):
    with pytest.raises((CheckpointError, FileNotFoundError)) as e, torch.inference_mode():
        N[loader]().load(name, *(["10", "fp32"] if loader == "LoadDDPM" else ["fp32"]))
    for part in [name, *parts]:
        assert part in str(e.value)
    kind = "ddpm" if loader == "LoadDDPM" else "clip_guidance"
    assert not any(name in k[0] for k in loaders._weights[kind])   # nothing half-loaded is cached
    with torch.inference_mode():  # the good file loads, from the cache when still held
        good = N[loader]().load(*([DDPM_FILE, "10", "fp32"] if loader == "LoadDDPM" else ["ViT-B-16.pt", "fp32"]))[0]
    assert good.model is models[0 if loader == "LoadDDPM" else 1].model


def test_pickle_carrying_code_is_refused_and_never_runs(models, reference, files, ckpt_dir, tmp_path, photo, capsys):
    for loader in ("LoadDDPM", "LoadCLIP"):
        with pytest.raises(CheckpointError, match="evil.pt: .*refused by safe loading"), torch.inference_mode():
            N[loader]().load("evil.pt", *(["10", "fp32"] if loader == "LoadDDPM" else ["fp32"]))
    img, mask = photo
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask,
                               model=files / "ddpm" / "evil.pt"), capsys)
    assert rc == 1 and "refused by safe loading" in cap.err
    assert not (files / "pwned").exists()                  # the pickled call never ran
    still_works(models, reference)


def test_bad_model_files_on_the_command_line(files, ckpt_dir, tmp_path, photo, capsys):
    img, mask = photo
    dd, cd = files / "ddpm", files / "clip_guidance"
    cases = [
        (["--model", tmp_path / "missing.pt"], ["missing.pt: file not found", "--model expects a guided-diffusion"]),
        (["--clip", tmp_path / "missing.pt"], ["missing.pt: file not found", "--clip expects an OpenAI CLIP"]),
        (["--model", dd / "empty.pt"], ["empty.pt: the file is empty"]),
        (["--model", dd / "truncated.pt"], ["truncated.pt: cannot be read", "truncated or corrupt"]),
        (["--model", dd / "clip.pt"], ["clip.pt: this is a CLIP model", "not a guided-diffusion UNet"]),
        (["--model", dd / "sd15.safetensors"], ["sd15.safetensors: this is a Stable Diffusion checkpoint"]),
        (["--model", dd / "odd_unet.pt"], ["odd_unet.pt: unknown architecture"]),
        (["--clip", cd / "unet.pt"], ["unet.pt: this is a guided-diffusion UNet", "not an OpenAI-format CLIP"]),
        (["--clip", cd / "clip_l.safetensors"], ["Hugging Face transformers CLIP"]),
    ]
    for extra, parts in cases:
        rc, cap = run_cli([*cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask), *extra], capsys)
        assert rc == 1, extra
        for part in parts:
            assert part in cap.err, (extra, cap.err)
        assert "Traceback" not in cap.err
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask), capsys)
    assert rc == 0, cap.err


# --- runtime ---------------------------------------------------------------------------------------
def test_cancel_extrapolation_then_it_runs_again(models, reference, monkeypatch):
    """(Cancel in the sampler: test_nodes.py::test_interrupt_mid_run_then_the_same_models_run_again;
    Ctrl-C on the command line: test_cli.py::test_edit_default_weights_from_models_folder_and_ctrl_c.)"""
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load(DDPM_FILE, "5", "fp32")[0]
    img = ramp(64, 48)

    def extend():
        with torch.inference_mode():
            return N["Extrapolate"]().extrapolate(img, ddpm, amount=0.25, seed=2, extend_left=False,
                                                  extend_right=True, prompt_right="a forest", num_views=1,
                                                  clip=models[1])[0]

    first = extend()
    seen = []

    class Cancelling(host.Progress):
        def update(self, step, preview=None, total=None):
            seen.append(step)
            super().update(step, preview, total)
            host.request_interrupt()                        # the user presses Cancel during a step

    monkeypatch.setattr(host, "progress", Cancelling)
    with pytest.raises(host.Interrupted):
        extend()
    assert seen == [1]
    monkeypatch.undo()
    assert not any(p.requires_grad or p.grad is not None for p in ddpm.model.parameters())
    assert torch.equal(extend(), first)
    still_works(models, reference)


def test_out_of_memory_splits_the_batch_then_reports_a_batch_of_one(models, reference, monkeypatch, caplog,
                                                                    ckpt_dir, tmp_path, photo, capsys):
    unsplit = node_edit(models, IMAGE, MASK, batch=3)
    real = edit_module.blended_diffusion
    sizes, always = [], [False]

    def tight_memory(ddpm, source, *args, **kwargs):
        sizes.append(source.shape[0])
        if source.shape[0] > 1 or always[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ddpm, source, *args, **kwargs)

    monkeypatch.setattr(edit_module, "blended_diffusion", tight_memory)
    split = node_edit(models, IMAGE, MASK, batch=3)
    assert sizes == [3, 1, 1, 1] and "out of memory at batch 3: retrying in batches of 1" in caplog.text
    assert split.shape == unsplit.shape and torch.allclose(split, unsplit, atol=1e-4)
    assert torch.equal(split[0], reference[0])
    always[0] = True
    with pytest.raises(torch.OutOfMemoryError, match="out of memory with a batch of 1: use a smaller model"):
        node_edit(models, IMAGE, MASK, batch=2)
    img, mask = photo
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask), capsys)
    assert rc == 1 and "error: out of memory with a batch of 1" in cap.err and "Traceback" not in cap.err
    monkeypatch.undo()
    rc, cap = run_cli(cli_edit(ckpt_dir, tmp_path / "o", "-p", "x", "-i", img, "--mask", mask), capsys)
    assert rc == 0, cap.err
    still_works(models, reference)


def test_cpu_allocator_failures_count_as_out_of_memory():
    """torch's CPU allocator failure is a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"),
    not torch.OutOfMemoryError: it counts as out of memory (so the batch is split), other errors do not. An
    address-space limit is noticed (there freed memory is returned at once instead of kept). The failed
    allocation runs in a child process: glibc's heap works differently for the rest of a process after it."""
    import subprocess
    import sys
    from pathlib import Path
    code = """
import sys
sys.path.insert(0, sys.argv[1])
from pack import load_pack
load_pack()
import torch
from blended_diffusion.models import memory
try:
    torch.empty(1 << 60, dtype=torch.uint8)  # refused at once by the kernel: nothing is allocated
except RuntimeError as e:
    print("KIND", memory.out_of_memory(e), isinstance(e, torch.OutOfMemoryError))
"""
    ran = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=300)
    assert "KIND sure False" in ran.stdout, ran.stdout + ran.stderr[-2000:]
    import resource

    from blended_diffusion.models import memory
    assert memory.out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) == "sure"
    assert memory.out_of_memory(MemoryError()) == "sure"
    with pytest.raises(RuntimeError) as other:
        torch.ones(2, 3) @ torch.ones(2, 3)
    assert memory.out_of_memory(other.value) is None and memory.out_of_memory(ValueError("x")) is None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        pytest.skip("this process already runs under an address-space limit")
    assert not memory.address_space_limited() or open("/proc/sys/vm/overcommit_memory").read().strip() == "2"
    resource.setrlimit(resource.RLIMIT_AS, (1 << 50, hard))  # 1 PiB: limits nothing, but is a limit
    try:
        assert memory.address_space_limited() and not memory.wanted()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# Runs the command line with a real limit on its data segment (RLIMIT_DATA, counted from what the imports
# took), so that torch's CPU allocator fails for real: no mock of torch.
LIMITED_CLI = """
import resource, sys
import torch
from blended_diffusion import cli
from blended_diffusion.models import apps  # noqa: F401  (imported before the limit: not part of the budget)
def data_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmData:"))
limit = (data_mib() + int(sys.argv[1])) << 20
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
sys.exit(cli.main(sys.argv[2:]))
"""


def test_cpu_out_of_memory_under_a_real_memory_limit(ckpt_dir, tmp_path, photo):
    """A batch that does not fit on the CPU is halved and retried until it fits (warning), and the run
    succeeds; where even one result does not fit: one error line naming the fixes, exit code 1, and no empty
    result folder left behind. Budgets: the 64 px model needs roughly 150 MiB for one result and far more than
    300 MiB for 8; the 256 px model needs far more than 300 MiB for one."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA and /proc/self/status: Linux only")
    small = tiny.save_unet(tmp_path / "64x64_uncond.pt", {k: v for k, v in tiny.UNET_64_CLASSES.items()
                                                          if k != "num_classes"})
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "blended_diffusion").symlink_to(Path(cli.__file__).parents[1], target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "OMP_NUM_THREADS": "1"}
    img, mask = photo

    def limited(budget_mib, model, batch, out):
        argv = ["edit", "-p", "a red ball", "-i", img, "--mask", mask, "--model", model, "--clip",
                ckpt_dir / "ViT-B-16.pt", "--timestep_respacing", "10", "--skip_timesteps", "9", "--aug_num", "2",
                "--batch_size", batch, "--iterations_num", "1", "--device", "cpu", "--output_path", out]
        return subprocess.run([sys.executable, "-c", LIMITED_CLI, str(budget_mib), *map(str, argv)], env=env,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "fits"
    ran = limited(300, small, 8, out)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "out of memory at batch 8: retrying in batches of" in ran.stderr and "Traceback" not in ran.stderr
    rec = json.loads((out / "output.json").read_text())
    assert sorted(r["batch_index"] for r in rec["results"]) == list(range(8))
    assert len(list((out / "ranked").iterdir())) == 8

    out = tmp_path / "never"
    ran = limited(300, ckpt_dir / "256x256_diffusion_uncond.pt", 2, out)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert ran.returncode == 1 and len(errors) == 1, ran.stderr[-3000:]
    assert "out of memory with a batch of 1" in errors[0] and "fewer augmentation views" in errors[0]
    assert "retrying in batches of 1" in ran.stderr and "Traceback" not in ran.stderr
    assert not out.exists()  # no empty ranked/ (or anything else) from a run that produced nothing


def test_model_too_large_for_the_memory_is_not_called_corrupt(ckpt_dir, tmp_path, photo):
    """Loading a checkpoint that does not fit in the memory left (a real RLIMIT_DATA of 15 MiB beyond the
    imports, for a 23 MB file) is reported as out of memory while loading it, not as a corrupt file or an
    unknown architecture."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA and /proc/self/status: Linux only")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "blended_diffusion").symlink_to(Path(cli.__file__).parents[1], target_is_directory=True)
    img, mask = photo
    model = ckpt_dir / "256x256_diffusion_uncond.pt"
    argv = ["edit", "-p", "a red ball", "-i", img, "--mask", mask, "--model", model, "--clip", ckpt_dir / "ViT-B-16.pt",
            "--device", "cpu", "--output_path", tmp_path / "out"]
    ran = subprocess.run([sys.executable, "-c", LIMITED_CLI, "15", *map(str, argv)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "OMP_NUM_THREADS": "1"})
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert ran.returncode == 1 and len(errors) == 1, ran.stderr[-3000:]
    assert f"out of memory while loading {model}" in errors[0] and "close other programs" in errors[0]
    assert "corrupt" not in errors[0] and "unknown" not in errors[0] and "Traceback" not in ran.stderr
    assert not (tmp_path / "out").exists()


def test_two_prompts_back_to_back_with_different_models(models, reference, files, ckpt_dir, tmp_path, photo,
                                                        capsys):
    with torch.inference_mode():
        ddpm_b = N["LoadDDPM"]().load("other.pt", "10", "fp32")[0]
        clip_b = N["LoadCLIP"]().load("other_clip.safetensors", "fp32")[0]
    assert ddpm_b.model is not models[0].model and clip_b.model is not models[1].model
    other = node_edit(models, IMAGE, MASK, ddpm=ddpm_b, clip=clip_b)
    assert_background_kept(other, IMAGE, MASK)
    assert not torch.equal(other, reference)
    still_works(models, reference)                          # model A again: unchanged by model B's run
    assert torch.equal(node_edit(models, IMAGE, MASK, ddpm=ddpm_b, clip=clip_b), other)
    img, mask = photo
    results = []
    for model, clip in ((ckpt_dir / DDPM_FILE, ckpt_dir / "ViT-B-16.pt"),
                        (files / "ddpm" / "other.pt", files / "clip_guidance" / "other_clip.safetensors")):
        out = tmp_path / model.stem
        rc, cap = run_cli([*cli_edit(ckpt_dir, out, "-p", "a dog", "-i", img, "--mask", mask, model=model),
                           "--clip", clip], capsys)
        assert rc == 0, cap.err
        assert json.loads((out / "output.json").read_text())["resolved"]["model"] == str(model)
        results.append(cli_result(out))
    assert not np.array_equal(*results)


def test_cpu_only_machine(models, reference, ckpt_dir, tmp_path, photo, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host.torch_device() == torch.device("cpu")
    host.free_memory()                                       # no CUDA: nothing to do, no error
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load(DDPM_FILE, "ddim5", "fp32")[0]
    assert ddpm.device.type == "cpu" and ddpm.model is models[0].model
    assert cli.resolve_device("auto") == torch.device("cpu") and cli.resolve_precision("auto", torch.device("cpu")) == "fp32"
    img, mask = photo
    argv = ["edit", "--model", ckpt_dir / DDPM_FILE, "--clip", ckpt_dir / "ViT-B-16.pt", "-p", "x", "-i", img,
            "--mask", mask, "--timestep_respacing", "10", "--skip_timesteps", "9", "--aug_num", "2",
            "--batch_size", "1", "--iterations_num", "1", "--output_path", tmp_path / "o"]
    rc, cap = run_cli([*argv, "--device", "cuda"], capsys)
    assert rc == 1 and "no CUDA GPU is visible to torch; use --device cpu" in cap.err
    rc, cap = run_cli(argv, capsys)                          # --device auto, --precision auto
    assert rc == 0, cap.err
    resolved = json.loads((tmp_path / "o" / "output.json").read_text())["resolved"]
    assert (resolved["device"], resolved["precision"]) == ("cpu", "fp32")
    still_works(models, reference)


# --- downloads -------------------------------------------------------------------------------------
def test_interrupted_or_corrupt_download_leaves_no_file_under_the_final_name(ckpt_dir, tmp_path, photo,
                                                                             monkeypatch, capsys):
    """Through `edit` with the default weight file served from 127.0.0.1: a wrong sha256 removes the
    download, Ctrl-C keeps only the .part, the next run completes it and edits. (Download details:
    tests/test_weights.py, e.g. test_checksum_mismatch_rejected_and_cleaned_up,
    test_gives_up_after_retries_and_never_uses_final_name, test_resume_of_an_existing_partial_file.)"""
    served = tmp_path / "served"
    served.mkdir()
    data = (ckpt_dir / DDPM_FILE).read_bytes()
    (served / W.DDPM_256.name).write_bytes(data)
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{W.DDPM_256.name}"
    models_root = tmp_path / "models"
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(models_root))
    final = models_root / "ddpm" / W.DDPM_256.name
    part = final.with_name(final.name + ".part")
    img, mask = photo
    argv = ["edit", "-p", "", "-i", img, "--mask", mask, *CLI_FAST, "--output_path", tmp_path / "o"]

    def serve(sha):
        monkeypatch.setitem(W.DEFAULT_WEIGHTS, "ddpm_256", W.WeightFile(
            name=W.DDPM_256.name, folder="ddpm", url=url, description="test", sha256=sha, size=len(data)))

    real_urlopen = urllib.request.urlopen

    def ctrl_c_midway(req, timeout=None):
        resp = real_urlopen(req, timeout=timeout)
        read, got = resp.read, [0]

        def reading(n=-1):
            if got[0] >= len(data) // 2:
                raise KeyboardInterrupt
            chunk = read(min(n, 4096) if n and n > 0 else 4096)
            got[0] += len(chunk)
            return chunk
        resp.read = reading
        return resp

    try:
        serve("0" * 64)                                     # the server sends other bytes than published
        rc, cap = run_cli(argv, capsys)
        assert rc == 1 and "sha256" in cap.err and "removed" in cap.err
        assert not final.exists() and not part.exists()
        serve(hashlib.sha256(data).hexdigest())
        monkeypatch.setattr(urllib.request, "urlopen", ctrl_c_midway)
        rc, cap = run_cli(argv, capsys)
        assert rc == 130 and not final.exists() and 0 < part.stat().st_size < len(data)
        monkeypatch.setattr(urllib.request, "urlopen", real_urlopen)
        rc, cap = run_cli(argv, capsys)                     # the next run completes it and edits
        assert rc == 0, cap.err
        assert final.read_bytes() == data and not part.exists()
        assert (tmp_path / "o" / "output_i_0_b_0.png").is_file()
    finally:
        httpd.shutdown()
        httpd.server_close()
