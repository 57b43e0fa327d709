"""Properties of the engine (models/): loaders, equality with guided-diffusion, background
exactness, determinism, batch invariance, guidance, ranking, extrapolation."""
import importlib

import open_clip
import pytest
import torch

import tiny
from blended_diffusion.models import (AugmentSettings, CheckpointError, Guide, d_clip, edit,
                                      load_clip, load_ddpm)
from blended_diffusion.models.apps import clip_scores, evaluate, extrapolate, rank
from blended_diffusion.models.blended import ddim_step, ddpm_step, generators
from blended_diffusion.models.ddpm import infer_unet_config
from blended_diffusion.models.guidance import guided_eps

FAST = AugmentSettings(num_views=2)


# --- loaders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [tiny.UNET_256, tiny.UNET_64_CLASSES])
def test_unet_config_inferred_from_weights(cfg):
    inferred = infer_unet_config(tiny.tiny_unet(cfg).state_dict())
    for key, value in cfg.items():
        assert inferred[key] == value, key


def test_unet_config_of_published_512_family():
    cfg = dict(image_size=512, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=1,
               attention_resolutions=(16,), channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_classes=1000,
               num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True)
    from guided_diffusion.unet import UNetModel
    inferred = infer_unet_config(UNetModel(**cfg).state_dict())
    assert {k: inferred[k] for k in cfg} == cfg


def test_ddpm_formats_and_overrides(ckpt_dir):
    a = load_ddpm(str(ckpt_dir / "256x256_diffusion_uncond.pt"), respacing="ddim25")
    b = load_ddpm(str(ckpt_dir / "uncond.safetensors"), respacing="100", image_size=256)
    assert a.num_steps == 25 and b.num_steps == 100 and a.image_size == 256
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = load_ddpm(str(ckpt_dir / "64x64_classes.pt"), respacing="10")
    assert c.num_classes == 10 and c.image_size == 64


def test_wrong_files_are_named(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match="CLIP model"):
        load_ddpm(str(ckpt_dir / "clip_sd.pt"))
    with pytest.raises(CheckpointError, match="guided-diffusion UNet"):
        load_clip(str(ckpt_dir / "256x256_diffusion_uncond.pt"))
    sd_like = tmp_path / "sd15.safetensors"
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(sd_like))
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        load_ddpm(str(sd_like))
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((ckpt_dir / "256x256_diffusion_uncond.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_ddpm(str(truncated))
    with pytest.raises(CheckpointError, match="not found"):
        load_ddpm(str(tmp_path / "missing.pt"))


class _Payload:  # a pickle that would run code when unpickled
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused by safe loading"):
        load_ddpm(str(path))


@pytest.mark.parametrize("name", ["ViT-B-16.pt", "clip_sd.pt", "clip.safetensors"])
def test_clip_formats_agree(ckpt_dir, name):
    ref = tiny.tiny_clip().eval()
    clip = load_clip(str(ckpt_dir / name))
    x = torch.rand(3, 3, 224, 224) * 2 - 1  # a batch: the loader runs CLIP sequence-first
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_image(clip.preprocess(x)), dim=-1)
    assert torch.allclose(clip.encode_image(clip.preprocess(x)), want, atol=1e-5)
    assert clip.encode_text("a dog") is clip.encode_text("a dog")  # cached
    with torch.no_grad():
        want_text = torch.nn.functional.normalize(ref.encode_text(open_clip.tokenize(["a dog"])), dim=-1)
    assert torch.allclose(clip.encode_text("a dog"), want_text, atol=1e-5)


# --- one step equals guided-diffusion --------------------------------------------------------
def _official_cond_fn(ddpm, guide, source, mask, gens):
    """The gradient the official code computes inside cond_fn (its own forward pass)."""
    def cond_fn(x, t_scaled, **kw):
        i = int(round(t_scaled[0].item() * ddpm.num_steps / 1000.0))
        for g, s in zip(gens, states):
            g.set_state(s)
        with torch.enable_grad():
            return guided_eps(ddpm, x, i, guide, source, mask, gens)[2]
    states = [g.get_state() for g in gens]
    return cond_fn


@pytest.mark.parametrize("ddim", [False, True])
def test_step_equals_guided_diffusion(ddpm, clip, ddim):
    torch.manual_seed(0)
    guide = Guide(clip=clip, prompt="a red ball", augment=FAST)
    source = torch.rand(2, 3, 256, 256) * 2 - 1
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 64:192, 64:192] = 1
    x, i = torch.randn(2, 3, 256, 256), 4
    gens = generators(7, 0, 2)
    cond_fn = _official_cond_fn(ddpm, guide, source, mask, gens)
    torch.manual_seed(123)
    noise = torch.randn_like(x)
    torch.manual_seed(123)
    t = torch.full((2,), i, dtype=torch.long)
    gd = ddpm.diffusion
    if ddim:
        ref = gd.ddim_sample(ddpm.model, x, t, clip_denoised=False, cond_fn=cond_fn, eta=0.0,
                              model_kwargs={})
    else:
        ref = gd.p_sample(ddpm.model, x, t, clip_denoised=False, cond_fn=cond_fn, model_kwargs={})
    eps, v, grad = guided_eps(ddpm, x, i, guide, source, mask, generators(7, 0, 2))
    assert grad is not None and grad.abs().sum() > 0
    ours = ddim_step(ddpm, x, i, eps, grad) if ddim else ddpm_step(ddpm, x, i, eps, v, grad, noise)
    assert torch.allclose(ours, ref["sample"], atol=1e-5, rtol=0)
    assert torch.allclose(ddpm.pred_xstart(x, i, eps), ref["pred_xstart"], atol=1e-5, rtol=0)


# --- whole edits -------------------------------------------------------------------------------
def test_background_exact_at_full_resolution(ddpm, clip, image_and_mask):
    img, mask = image_and_mask
    out = edit(ddpm, img, mask, Guide(clip=clip, prompt="a dog", augment=FAST), skip_timesteps=7,
               batch_size=2, seed=1)
    assert out.shape == (2, 3, 96, 128)
    to8 = lambda t: (t * 255).round().to(torch.uint8)  # noqa: E731
    outside = (mask == 0).expand(2, 3, -1, -1)
    assert torch.equal(to8(out)[outside], to8(img.expand(2, -1, -1, -1))[outside])
    assert (out - img).abs()[~outside].mean() > 0.01  # the masked region did change


def test_tiny_mask_in_a_big_image_gets_the_model_resolution(ddpm, monkeypatch):
    """Issue 11, point 9: a 6x6 mask in a 1500x1000 photo. The working square is the mask's box plus
    context, at least 256 / MAX_ZOOM = 64 px, enlarged to the model's 256 px: the model sees the mask
    about 24 px wide (6 px when the square was never smaller than the model). Outside the mask the
    result is the input, bit for bit."""
    edit_module = importlib.import_module("blended_diffusion.models.edit")  # the module, not edit()
    seen = []
    real = edit_module.blended_diffusion

    def recording(ddpm_, source, mask, *args, **kwargs):  # the real loop; keeps what the model got
        seen.append((source.detach().cpu().clone(), mask.detach().cpu().clone()))
        return real(ddpm_, source, mask, *args, **kwargs)
    monkeypatch.setattr(edit_module, "blended_diffusion", recording)
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 1000), torch.linspace(0, 1, 1500), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])[None] * 0.8 + 0.1 * torch.rand(1, 3, 1000, 1500, generator=g)
    img = (img * 255).round() / 255
    mask = torch.zeros(1, 1000, 1500)
    mask[:, 700:706, 1100:1106] = 1
    out = edit(ddpm, img, mask, Guide(), skip_timesteps=8, seed=3)
    outside = (mask == 0).expand(1, 3, -1, -1)
    assert out.shape == img.shape and torch.equal(out[outside], img[outside])
    assert (out - img).abs()[~outside].max() > 0.01  # the mask was edited
    (source, m), = seen
    assert source.shape == (1, 3, 256, 256) and m.shape == (1, 1, 256, 256)
    ys, xs = torch.nonzero(m[0, 0] > 0.5, as_tuple=True)
    assert 20 <= int(xs.max() - xs.min()) + 1 <= 28 and 20 <= int(ys.max() - ys.min()) + 1 <= 28
    assert float(m.mean()) > 0.006  # (6/64)² ≈ 0.9 % of the model's square; 0.05 % before


def test_small_masks_fill_more_of_the_model_square():
    """The table in README (Limits and errors), from tests/small_masks.py: masks of 4, 20 and 100 px in a
    2000² image. A mask whose box plus context is at least the model size keeps today's square."""
    import small_masks
    from blended_diffusion.models.region import plan_box
    now = {n: small_masks.seen_by_model(n) for n in small_masks.SIZES}
    before = {n: small_masks.seen_by_model(n, max_zoom=1) for n in small_masks.SIZES}
    assert [now[n][0] for n in (4, 20, 100)] == [64, 64, 150] and all(before[n][0] == 256 for n in before)
    assert now[4][2] > 10 * before[4][2] and now[20][2] > 0.09 and abs(now[100][2] - (100 / 150) ** 2) < 0.01
    assert small_masks.seen_by_model(200) == small_masks.seen_by_model(200, max_zoom=1)  # 300 px ≥ 256
    m = torch.zeros(2000, 2000)
    m[900:1000, 900:1000] = 1
    assert plan_box(m, 256, context=0.5).side == 200 and plan_box(m, 256, context=0).side == 100
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="context = .*finite number >= 0"):
            plan_box(m, 256, context=bad)


def test_fidelity_sweep_uses_the_context(ddpm, image_and_mask):
    """The fidelity sweep's Blended Diffusion runs (CLI fidelity --context, FidelityCurve's context) crop as
    edit() does with that context."""
    from blended_diffusion.models import fidelity as fid
    img, mask = image_and_mask
    run, = fid.blended_runs(ddpm, Guide(), img, mask, [8], seed=2, context=1.0)
    wide = run.make()
    assert torch.equal(wide, edit(ddpm, img, mask, Guide(), skip_timesteps=8, seed=2, context=1.0))
    assert not torch.equal(wide, edit(ddpm, img, mask, Guide(), skip_timesteps=8, seed=2))


def test_empty_mask_returns_input(ddpm, image_and_mask, caplog):
    img, mask = image_and_mask
    out = edit(ddpm, img, torch.zeros_like(mask), Guide(), skip_timesteps=8, batch_size=2)
    assert torch.equal(out, img.expand(2, -1, -1, -1)) and "mask is empty" in caplog.text


def test_cpu_sampling_keeps_freed_memory_only_while_it_runs(ddpm, image_and_mask, monkeypatch):
    """models/memory.py: edit() on the CPU keeps freed memory while it samples (freed blocks reused
    without page faults) and restores glibc's behaviour after (large freed blocks go back to the kernel)."""
    import sys

    from pack import refault_share
    from blended_diffusion.models import memory
    if not sys.platform.startswith("linux") or not memory.available():
        pytest.skip("glibc only")
    for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "BLENDED_DIFFUSION_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(k, raising=False)
    memory.keep_freed_memory(False)
    inside = []
    img, mask = image_and_mask
    edit(ddpm, img, mask, Guide(), skip_timesteps=8, callback=lambda *a: inside.append(refault_share(256)))
    assert len(inside) == 2 and max(inside) < 0.1
    assert refault_share() > 0.5
    monkeypatch.setenv("BLENDED_DIFFUSION_KEEP_FREED_MEMORY", "0")  # opted out: defaults all along
    inside.clear()
    edit(ddpm, img, mask, Guide(), skip_timesteps=8, callback=lambda *a: inside.append(refault_share()))
    assert min(inside) > 0.5


def test_determinism_and_batch_invariance(ddpm, clip, image_and_mask):
    img, mask = image_and_mask
    guide = Guide(clip=clip, prompt="a cat", augment=FAST)
    kw = dict(skip_timesteps=8, seed=3)
    four = edit(ddpm, img, mask, guide, batch_size=4, **kw)
    again = edit(ddpm, img, mask, guide, batch_size=4, **kw)
    two_by_two = edit(ddpm, img, mask, guide, batch_size=4, max_batch=2, **kw)
    assert torch.equal(four, again)
    assert torch.allclose(four, two_by_two, atol=1e-4)
    assert (four[0] - four[1]).abs().max() > 0.05  # results differ from each other
    other_seed = edit(ddpm, img, mask, guide, batch_size=1, skip_timesteps=8, seed=4)
    assert (other_seed[0] - four[0]).abs().max() > 0.05


def test_works_inside_inference_mode(ddpm, clip, image_and_mask):
    img, mask = image_and_mask
    with torch.inference_mode():
        out = edit(ddpm, img.clone(), mask.clone(), Guide(clip=clip, prompt="a cat", augment=FAST),
                   skip_timesteps=8)
    assert torch.isfinite(out).all()


def test_guidance_lowers_clip_distance(ckpt_dir, clip, image_and_mask):
    """Same seeds, with and without CLIP guidance: guided results are closer to the prompt."""
    ddpm = load_ddpm(str(ckpt_dir / "64x64_classes.pt"), respacing="10")
    img, mask = image_and_mask
    prompt = "a bright red square"
    kw = dict(skip_timesteps=5, batch_size=2, seed=11, class_label=0)
    free = edit(ddpm, img, mask, Guide(), **kw)
    guided = edit(ddpm, img, mask, Guide(clip=clip, prompt=prompt, clip_lambda=20000,
                                         augment=FAST), **kw)
    assert clip_scores(clip, guided, mask, prompt).mean() < clip_scores(clip, free, mask, prompt).mean()


def test_ddim_and_algorithm1(ddpm, clip, image_and_mask):
    img, mask = image_and_mask
    g = Guide(clip=clip, prompt="a cat", augment=FAST, l2_lambda=10000, lpips_lambda=1000)
    alg1 = edit(ddpm, img, mask, g, skip_timesteps=8, blend=False, enforce_background=False)
    alg3 = edit(ddpm, img, mask, Guide(clip=clip, prompt="a cat", augment=FAST), skip_timesteps=8,
                ddim=True)
    outside = (mask == 0).expand(1, 3, -1, -1)
    assert (alg1 - img).abs()[outside].max() > 0  # Algorithm 1 does not preserve exactly
    assert torch.equal(alg3[outside], img[outside])


def test_bad_numbers_are_rejected(ddpm, image_and_mask):
    img, mask = image_and_mask
    with pytest.raises(ValueError, match="skip_timesteps"):
        edit(ddpm, img, mask, Guide(), skip_timesteps=10)
    with pytest.raises(ValueError, match="batch size"):
        edit(ddpm, img, mask, Guide(), skip_timesteps=8, batch_size=0)
    with pytest.raises(ValueError, match="at least 1"):
        AugmentSettings(num_views=0)
    with pytest.raises(ValueError, match="NaN"):
        edit(ddpm, img * float("nan"), mask, Guide(), skip_timesteps=8)


# --- ranking, evaluation, extrapolation --------------------------------------------------------
def test_ranking_orders_by_clip_distance(clip):
    imgs = torch.rand(4, 3, 64, 64)
    order, scores = rank(clip, imgs, None, "a dog")
    assert scores.shape == (4,) and torch.all(scores[order][:-1] <= scores[order][1:])
    x = clip.preprocess(imgs * 2 - 1)  # the same numbers computed directly, with CLIP normalisation
    assert torch.allclose(scores, d_clip(clip.encode_image(x), clip.encode_text("a dog")), atol=1e-5)


def test_evaluate_reports_background_difference(clip, image_and_mask):
    img, mask = image_and_mask
    changed = img.clone()
    changed[..., 0, 0] = 1 - changed[..., 0, 0]  # one pixel outside the mask
    rows = evaluate(torch.cat([img, changed]), img, mask, clip, "a dog")
    assert rows[0]["max_abs_bg"] == 0 and rows[1]["max_abs_bg"] > 0.1
    assert rows[0]["clip_distance"] is not None and rows[0]["lpips_bg"] == pytest.approx(0, abs=1e-6)


def test_extrapolation_size_exactness_and_seam(ckpt_dir, clip):
    ddpm = load_ddpm(str(ckpt_dir / "64x64_classes.pt"), respacing="10")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])[None]
    out = extrapolate(ddpm, clip, img, {"left": "fire", "right": "snow"}, amount=0.3,
                      num_views=2, seed=5)
    w0 = round(64 * 64 / 48)
    add = -(-3 * w0 // 10)
    assert out.shape == (1, 3, 64, w0 + 2 * add)
    ref = torch.nn.functional.interpolate(img, size=(64, w0), mode="bicubic", antialias=True,
                                          align_corners=False).clamp(0, 1)
    assert torch.equal(out[..., add:add + w0], ref)  # original pixels kept exactly
    steps = (out[0, :, :, 1:] - out[0, :, :, :-1]).abs().mean((0, 1))
    new_cols = torch.cat([steps[:add - 1], steps[add + w0:]])
    assert steps[add - 1] <= new_cols.mean() and steps[add + w0 - 1] <= new_cols.mean()  # no seam
    with pytest.raises(ValueError, match="direction"):
        extrapolate(ddpm, clip, img, {"sideways": "x"})
    with pytest.raises(ValueError, match="amount"):
        extrapolate(ddpm, clip, img, {"left": "x"}, amount=0)


@pytest.mark.parametrize("host_frees", [True, False])
def test_out_of_memory_asks_the_host_first_then_splits(ddpm, image_and_mask, monkeypatch, host_frees):
    """``on_oom`` (issue 13): asked once at the first out-of-memory; when the host freed memory the same batch is
    retried, else (and at any later out-of-memory) the batch is halved as before. Results equal an unhindered run."""
    edit_module = importlib.import_module("blended_diffusion.models.edit")
    img, mask = image_and_mask
    plain = edit(ddpm, img, mask, Guide(), skip_timesteps=8, seed=5, batch_size=2)
    real, sizes, asked = edit_module.blended_diffusion, [], []

    def short_once(d, source, *args, **kwargs):
        sizes.append(source.shape[0])
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(d, source, *args, **kwargs)

    monkeypatch.setattr(edit_module, "blended_diffusion", short_once)
    out = edit(ddpm, img, mask, Guide(), skip_timesteps=8, seed=5, batch_size=2,
               on_oom=lambda device: asked.append(torch.device(device)) or host_frees)
    assert asked == [ddpm.device]
    assert sizes == ([2, 2] if host_frees else [2, 1, 1])
    assert torch.allclose(out, plain, atol=1e-5)
