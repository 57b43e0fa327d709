"""The ComfyUI node layer on tiny checkpoints, standalone (no ComfyUI): schemas, every node's
execution, inference mode, exact background, model cache, interrupt, LoadImage mask semantics,
and the standalone API-workflow runner."""
import inspect
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from blended_diffusion import host
from blended_diffusion.host import EXAMPLES_DIR
from blended_diffusion.cli import runner
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, loaders
from blended_diffusion.nodes.common import NoiseState

N = NODE_CLASS_MAPPINGS
OURS = {"BD_DDPM", "BD_CLIP", "BD_NOISE", "BD_STEP", "BD_BLEND", "BD_AUGMENT", "BD_INVERSION"}
CORE = {"IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN"}
SD = {"MODEL", "CLIP", "VAE"}  # ComfyUI's own Stable Diffusion objects: inputs of the NULL-text nodes only


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from two, and a shared, busy machine makes
    two spinning threads many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models_dir(ckpt_dir, tmp_path_factory):
    """$BLENDED_DIFFUSION_MODELS with ddpm/ and clip_guidance/ holding the tiny files."""
    root = tmp_path_factory.mktemp("models")
    (root / "ddpm").mkdir()
    (root / "clip_guidance").mkdir()
    for name in ("64x64_classes.pt", "256x256_diffusion_uncond.pt"):
        os.symlink(ckpt_dir / name, root / "ddpm" / name)
    os.symlink(ckpt_dir / "ViT-B-16.pt", root / "clip_guidance" / "ViT-B-16.pt")
    (root / "ddpm" / "README.txt").write_text("not a model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLENDED_DIFFUSION_MODELS", str(root))
        loaders.clear_cache()
        yield root
        loaders.clear_cache()


def graph(image="bd_scene_mask.png", prompt="a blue cube", batch=2, sampler="DDPM", views=2, fixed=False,
          blend=True, clip=True, respacing="10", class_label=-1, invert=False, skip=7):
    """API-format workflow: LoadImage → NoiseImage → CLIPGuidedStep → MaskBlend → sampler → SaveImage."""
    wf = {
        "1": {"class_type": "LoadDDPM", "inputs": {"ckpt_name": "64x64_classes.pt", "respacing": respacing,
                                                   "precision": "fp32"}},
        "2": {"class_type": "LoadCLIP", "inputs": {"clip_name": "ViT-B-16.pt", "precision": "fp32"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "NoiseImage", "inputs": {"image": ["3", 0], "ddpm": ["1", 0], "skip_timesteps": skip,
                                                     "strength": 0.0, "noise_seed": 3, "fixed_noise": fixed,
                                                     "ddim_inversion": invert}},
        "5": {"class_type": "ExtendingAugment", "inputs": {"num_views": views, "degrees": 15.0, "translate": 0.1,
                                                           "affine_p": 0.7, "distortion": 0.7,
                                                           "perspective_p": 0.7, "preview_seed": 0}},
        "6": {"class_type": "CLIPGuidedStep", "inputs": {"ddpm": ["1", 0], "augment": ["5", 0], "prompt": prompt,
                                                         "clip_lambda": 1000.0, "range_lambda": 50.0,
                                                         "lpips_lambda": 0.0, "l2_lambda": 0.0, "fast": False}},
        "7": {"class_type": "MaskBlend", "inputs": {"mask": ["3", 1], "invert": False, "feather": 0,
                                                    "enforce_background": True}},
        "8": {"class_type": "BlendedDiffusionSampler", "inputs": {"noise": ["4", 0], "step": ["6", 0], "seed": 404,
                                                                  "batch_size": batch, "sampler": sampler,
                                                                  "class_label": class_label}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bd/edit"}},
    }
    if clip:
        wf["6"]["inputs"]["clip"] = ["2", 0]
    wf["8"]["inputs"]["blend" if blend else "mask"] = ["7", 0] if blend else ["3", 1]
    return wf


@pytest.fixture(scope="module")
def reference(models_dir, tmp_path_factory):
    """One guided Algorithm 2 run through the runner (inside torch.inference_mode)."""
    return runner.run_workflow(graph(), output_dir=tmp_path_factory.mktemp("out"))


def _alpha_mask(name):
    """Where the PNG's alpha is 0, read directly with PIL (the region the user erased/painted)."""
    return torch.from_numpy(np.asarray(Image.open(EXAMPLES_DIR / name).getchannel("A")) == 0)


# --- schemas ----------------------------------------------------------------------------------------
EXPECTED = {"LoadDDPM", "LoadCLIP", "NoiseImage", "CLIPGuidedStep", "MaskBlend", "ExtendingAugment",
            "RankByCLIP", "Extrapolate", "BlendedDiffusionSampler", "BlendedDiffusionEvaluate"}
# nodes/nulltext.py: ComfyUI MODEL/CLIP/VAE in, so they run in tests/test_nulltext_nodes.py (needs ComfyUI)
NULLTEXT = {"NullTextInvert", "SaveInversion", "LoadInversion", "NullTextEdit", "NullTextSDEdit", "FidelityCurve",
            "CompareInversionMethods"}


def test_node_ids_and_display_names():
    assert set(N) == EXPECTED | NULLTEXT
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED | NULLTEXT
    assert all(isinstance(v, str) and v for v in NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("node_id", sorted(EXPECTED | NULLTEXT))
def test_node_schema(node_id, models_dir):
    cls = N[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    names = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            names.append(name)
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{name}: tooltip"
            if isinstance(kind, list):  # combo
                assert all(isinstance(o, str) for o in kind), name
                assert "default" not in opts or opts["default"] in kind, name
            else:
                assert isinstance(kind, str) and kind in CORE | OURS | (SD if node_id in NULLTEXT else set()), \
                    f"{name}: type {kind!r}"
                if kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], name
                if kind in ("STRING", "BOOLEAN"):
                    assert "default" in opts, name
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert set(cls.RETURN_TYPES) <= CORE | OURS
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert cls.CATEGORY.startswith("Blended Diffusion/")
    assert isinstance(cls.DESCRIPTION, str)
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    has_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in names:
        assert name in params or has_kwargs, f"{cls.FUNCTION} does not take {name!r}"
    for name, p in params.items():  # every parameter without a default is a required input
        if name != "self" and p.default is p.empty and p.kind is not p.VAR_KEYWORD:
            assert name in spec["required"], name


def test_loader_combos_list_the_model_folders(models_dir):
    ddpm_names = N["LoadDDPM"].INPUT_TYPES()["required"]["ckpt_name"]
    # README.txt left out; the official 512x512_diffusion.pt listed though absent (issue 13: fetched on first use)
    assert ddpm_names[0] == ["256x256_diffusion_uncond.pt", "512x512_diffusion.pt", "64x64_classes.pt"]
    assert ddpm_names[1]["default"] == "256x256_diffusion_uncond.pt"
    assert N["LoadCLIP"].INPUT_TYPES()["required"]["clip_name"][0] == ["ViT-B-16.pt"]
    with pytest.raises(FileNotFoundError, match="ddpm"):
        host.model_path("ddpm", "512x512_diffusion.pt")


# --- loaders and their cache ------------------------------------------------------------------------
def test_loader_cache_and_inference_mode(models_dir):
    with torch.inference_mode():  # as ComfyUI runs nodes
        a = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
        b = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
        c = N["LoadDDPM"]().load("64x64_classes.pt", "5", "fp32")[0]
        d = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
        k1 = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
        k2 = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
        k3 = N["LoadCLIP"]().load("ViT-B-16.pt", "bf16")[0]
    assert a is b is d                          # same settings: the cached object
    assert c is not a and c.num_steps == 5 and a.num_steps == 10
    assert c.model is a.model                   # respacing changed: weights not reloaded
    assert k1 is k2 and k3 is not k1 and k3.model is k1.model and k3.precision == "bf16"
    # nothing the loaders made is an inference tensor (autograd must be able to use it)
    assert not any(p.is_inference() for p in a.model.parameters())
    assert not any(t.is_inference() for t in [*a.schedule.tensors(), *c.schedule.tensors()])
    assert not any(p.is_inference() for p in k1.model.parameters())


def test_loader_reloads_a_changed_file(models_dir, ckpt_dir, tmp_path):
    import shutil
    path = models_dir / "ddpm" / "copy.pt"
    shutil.copy(ckpt_dir / "64x64_classes.pt", path)
    a = N["LoadDDPM"]().load("copy.pt", "10", "fp32")[0]
    os.utime(path, ns=(1, 1))  # the file was replaced: it is read again
    b = N["LoadDDPM"]().load("copy.pt", "10", "fp32")[0]
    assert b is not a and b.model is not a.model
    path.unlink()


# --- the blended loop -------------------------------------------------------------------------------
def test_sampler_keeps_background_exactly_and_edits_the_painted_region(reference):
    """LoadImage's MASK is 1 where alpha is 0 (the painted/erased area): exactly that area is edited,
    everything else comes back bit-identical in 8-bit values; inside torch.inference_mode."""
    src, mask = reference.outputs["3"]
    out = reference.outputs["8"][0]
    painted = _alpha_mask("bd_scene_mask.png")
    assert torch.equal(mask[0] > 0.5, painted) and painted.any() and (~painted).any()
    assert out.shape == (2, *src.shape[1:])
    src8 = (src[0] * 255).round()
    for result in out:
        r8 = (result * 255).round()
        assert torch.equal(r8[~painted], src8[~painted])        # background: exact
        assert (r8[painted] - src8[painted]).abs().max() > 10   # the painted area was regenerated
    assert not torch.equal(out[0], out[1])                      # a batch of different results
    assert len(reference.files) == 2 and all(p.is_file() for p in reference.files)
    with Image.open(reference.files[0]) as im:
        assert im.size == (512, 384)


def test_interrupt_mid_run_then_the_same_models_run_again(reference, models_dir, tmp_path, monkeypatch):
    seen = []

    class InterruptingProgress(host.Progress):
        def update(self, step, preview=None, total=None):
            seen.append((step, None if preview is None else tuple(preview.shape)))
            super().update(step, preview, total)
            host.request_interrupt()  # the user presses Cancel during step 1

    monkeypatch.setattr(host, "progress", InterruptingProgress)
    with pytest.raises(host.Interrupted):
        runner.run_workflow(graph(), output_dir=tmp_path)
    assert seen == [(1, (2, 3, 64, 64))]                  # stopped after the first of 3 steps, x̂0 preview
    monkeypatch.undo()
    again = runner.run_workflow(graph(), output_dir=tmp_path)  # cached models, same seed
    assert again.outputs["1"][0] is reference.outputs["1"][0]
    assert torch.equal(again.outputs["8"][0], reference.outputs["8"][0])


def test_empty_prompt_without_clip_algorithm1_ddim_and_fixed_noise(models_dir, tmp_path):
    """Removal (no prompt, no CLIP), Algorithm 1 (mask, no blend), DDIM, a fixed class: with fixed noise
    the two results start from the same x_k and, unguided and deterministic, are identical; without it
    they differ."""
    kw = dict(prompt="", clip=False, blend=False, sampler="DDIM", class_label=3)
    fixed = runner.run_workflow(graph(fixed=True, **kw), output_dir=tmp_path).outputs["8"][0]
    free = runner.run_workflow(graph(**kw), output_dir=tmp_path).outputs["8"][0]
    assert torch.equal(fixed[0], fixed[1]) and not torch.equal(free[0], free[1])
    # Algorithm 1 has no blend: the whole working square around the mask is regenerated (the
    # background drifts, the paper's motivation for Algorithm 2); outside that square nothing changes
    from blended_diffusion.models.region import plan_box
    painted = _alpha_mask("bd_scene_mask.png")
    src = torch.from_numpy(np.array(Image.open(EXAMPLES_DIR / "bd_scene_mask.png").convert("RGB"))) / 255
    box = plan_box(painted.float(), 64, 0.25)
    inside = torch.zeros_like(painted)
    inside[max(box.top, 0):box.top + box.side, max(box.left, 0):box.left + box.side] = True
    assert torch.equal(free[0][~inside], src[~inside]) and (~inside).any()
    assert not torch.equal(free[0][painted], src[painted])
    assert not torch.equal(free[0][inside & ~painted], src[inside & ~painted])


def test_sampler_context_input_sets_the_working_square(models_dir, tmp_path):
    """The sampler's context input (issue 11, point 9; last input, default 0.25): without a blend
    (Algorithm 1) the whole working square is regenerated, and that square is the mask's box grown by
    context on each side; outside it nothing changes. Out-of-range values are refused."""
    from blended_diffusion.models.region import plan_box
    painted = _alpha_mask("bd_scene_mask.png")
    src = torch.from_numpy(np.array(Image.open(EXAMPLES_DIR / "bd_scene_mask.png").convert("RGB"))) / 255
    sides = []
    for context in (0.0, 1.0):
        wf = graph(prompt="", clip=False, blend=False, sampler="DDIM", class_label=3, batch=1)
        wf["8"]["inputs"]["context"] = context
        out = runner.run_workflow(wf, output_dir=tmp_path).outputs["8"][0]
        box = plan_box(painted.float(), 64, context)
        ys, xs = torch.nonzero((out[0] != src).any(-1), as_tuple=True)
        assert (ys.min(), ys.max() + 1) == (max(box.top, 0), min(box.top + box.side, 384)), context
        assert (xs.min(), xs.max() + 1) == (max(box.left, 0), min(box.left + box.side, 512)), context
        sides.append(box.side)
    assert sides == [105, 315]  # the painted box is 105 px: 105 · (1 + 2 · context)
    for bad in (-0.1, 4.5):
        wf = graph(prompt="", clip=False, blend=False)
        wf["8"]["inputs"]["context"] = bad
        with pytest.raises(ValueError, match=f"context = {bad} is outside the allowed range 0.0..4.0"):
            runner.run_workflow(wf, output_dir=tmp_path)


def test_ddim_inversion_start_is_deterministic_and_reconstructs(models_dir, tmp_path):
    """NoiseImage's ddim_inversion: x_k is the DDIM inversion of the source, so unguided, unblended DDIM
    results no longer depend on the seed (a blend would add fresh background noise each step) and stay
    closer to the source than from a noised x_k (issue 7 item 5)."""
    kw = dict(prompt="", clip=False, sampler="DDIM", class_label=3, skip=8, blend=False)
    with torch.inference_mode():  # as ComfyUI runs nodes
        inv = runner.run_workflow(graph(invert=True, **kw), output_dir=tmp_path).outputs["8"][0]
        other_seed = graph(invert=True, **kw)
        other_seed["8"]["inputs"]["seed"] = 5
        inv5 = runner.run_workflow(other_seed, output_dir=tmp_path).outputs["8"][0]
        noised = runner.run_workflow(graph(**kw), output_dir=tmp_path).outputs["8"][0]
    assert torch.equal(inv, inv5) and torch.equal(inv[0], inv[1]) and not torch.equal(noised[0], noised[1])
    painted = _alpha_mask("bd_scene_mask.png")
    src = torch.from_numpy(np.array(Image.open(EXAMPLES_DIR / "bd_scene_mask.png").convert("RGB"))) / 255
    err = lambda out: (out[0][painted] - src[painted]).abs().mean()  # noqa: E731
    assert err(inv) < err(noised)


def test_prompt_without_clip_is_a_clear_error(models_dir):
    ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
    with pytest.raises(ValueError, match="LoadCLIP"):
        N["CLIPGuidedStep"]().step(ddpm, "a dog")


def test_noise_image_strength_preview_and_schedule_mismatch(models_dir):
    ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
    other = N["LoadDDPM"]().load("64x64_classes.pt", "5", "fp32")[0]
    img = torch.rand(1, 40, 56, 3)
    with torch.inference_mode():
        state, preview = N["NoiseImage"]().noise(img, ddpm, skip_timesteps=2, strength=0.3)
        s2, _ = N["NoiseImage"]().noise(img, ddpm, skip_timesteps=999)
    assert isinstance(state, NoiseState) and state.skip_timesteps == 7 and state.noise is None
    assert s2.skip_timesteps == 9                            # capped to steps - 1
    assert preview.shape == img.shape and 0 <= preview.min() and preview.max() <= 1
    assert (preview - img).abs().mean() > 0.05                # the preview is noised
    step = N["CLIPGuidedStep"]().step(other, "")[0]
    with pytest.raises(ValueError, match="same LoadDDPM"):
        N["BlendedDiffusionSampler"]().sample(state, step, batch_size=1)


def test_mask_blend_invert_feather_and_source_check(models_dir):
    m = torch.zeros(1, 32, 32)
    m[:, 8:24, 8:24] = 1
    blend, used = N["MaskBlend"]().blend(m, invert=True, feather=0)
    assert torch.equal(used, 1 - m) and blend.enforce_background
    _, soft = N["MaskBlend"]().blend(m, feather=4)
    assert soft[0, 16, 16] > 0.99 and soft[0, 0, 0] < 0.01 and 0.2 < soft[0, 8, 16] < 0.8  # soft edge
    ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
    img = torch.rand(1, 32, 32, 3)
    state, _ = N["NoiseImage"]().noise(img, ddpm, skip_timesteps=8)
    other, _ = N["MaskBlend"]().blend(m, source=torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match="source differs"):
        N["BlendedDiffusionSampler"]().sample(state, N["CLIPGuidedStep"]().step(ddpm, "")[0], batch_size=1,
                                              blend=other)


def test_extending_augment_views(models_dir):
    img = torch.rand(1, 50, 70, 3)
    settings, views = N["ExtendingAugment"]().settings(num_views=5, image=img)
    assert settings.num_views == 5 and views.shape == (5, 224, 224, 3)
    side = torch.nn.functional.interpolate(img.movedim(-1, 1)[..., 10:60], size=(224, 224), mode="bilinear",
                                           antialias=True, align_corners=False).movedim(1, -1)[0]
    assert torch.allclose(views[0], side, atol=1e-4)        # view 0 is the unaugmented (center-cropped) image
    assert all((views[i] - views[0]).abs().mean() > 1e-3 for i in range(1, 5))
    _, grid = N["ExtendingAugment"]().settings(num_views=2)
    assert grid.shape == (2, 224, 224, 3)


# --- applications -----------------------------------------------------------------------------------
def test_rank_by_clip_sorts_best_first(reference, models_dir):
    from blended_diffusion.models import apps
    clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
    imgs = torch.cat([reference.outputs["8"][0], reference.outputs["3"][0]])  # 3 images
    mask = reference.outputs["3"][1]
    with torch.inference_mode():
        out = N["RankByCLIP"]().rank(imgs, clip, "a blue cube", top_k=2, mask=mask)
    ranked, scores, report = out["result"]
    expected = apps.clip_scores(clip, imgs.movedim(-1, 1), mask, "a blue cube")
    order = torch.argsort(expected)[:2]
    assert torch.equal(ranked, imgs[order]) and scores == sorted(scores) and len(scores) == 2
    assert np.allclose(scores, expected[order].numpy())
    assert out["ui"]["text"] == [report] and report.count("\n") == 1


def test_evaluate_reports_background_change(reference, models_dir):
    clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
    win = (slice(None), slice(190, 320), slice(260, 400))   # around the edit (LPIPS on 512x384 is slow)
    src, mask = (t[win] for t in reference.outputs["3"])
    results = reference.outputs["8"][0][win]
    spoiled = results[:1].clone()
    spoiled[0, 0, 0] = 1 - spoiled[0, 0, 0]  # one background pixel changed
    with torch.inference_mode():
        out = N["BlendedDiffusionEvaluate"]().evaluate(torch.cat([results, spoiled]), src, mask, "a blue cube", clip)
    rows = json.loads(out["result"][0])
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["max_abs_bg"] == 0 and rows[1]["max_abs_bg"] == 0 and rows[2]["max_abs_bg"] > 0.01
    assert all(isinstance(r["clip_distance"], float) for r in rows)


def test_extrapolate_grows_the_image(models_dir):
    ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
    img = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        out = N["Extrapolate"]().extrapolate(img, ddpm, amount=0.25, seed=1, sampler="DDIM", extend_left=False,
                                             extend_right=True, prompt_right="")[0]
    assert out.shape == (1, 64, 80, 3)
    assert torch.allclose(out[:, :, :64], img, atol=1e-5)   # the original pixels are kept
    with pytest.raises(ValueError, match="extend_"):
        N["Extrapolate"]().extrapolate(img, ddpm, extend_left=False, extend_right=False)


# --- the standalone runner and its core stand-ins -----------------------------------------------------
def test_runner_load_image_without_alpha_and_outpaint_pad(tmp_path):
    img, mask = runner.StandaloneLoadImage().load_image("bd_scene.png")
    assert img.shape == (1, 384, 512, 3) and mask.shape == (1, 64, 64) and not mask.any()  # as core
    small = torch.rand(1, 12, 10, 3)
    new, m = runner.StandaloneImagePadForOutpaint().expand_image(small, 8, 0, 0, 4, 3)
    # core's loop, written out
    d2, d3, top, bottom, left, right, f = 12, 10, 0, 4, 8, 0, 3
    t = torch.zeros(d2, d3)
    for i in range(d2):
        for j in range(d3):
            d = min(i if top else d2, d2 - i if bottom else d2, j if left else d3, d3 - j if right else d3)
            if d < f:
                t[i, j] = ((f - d) / f) ** 2
    assert new.shape == (1, 16, 18, 3) and torch.equal(new[:, :12, 8:], small) and (new[:, 12:] == 0.5).all()
    assert m.shape == (1, 16, 18)  # [1, H, W], as core's ImagePadForOutpaint returns
    m = m[0]
    assert torch.allclose(m[:12, 8:], t) and (m[:, :8] == 1).all() and (m[12:] == 1).all()
    scaled = runner.StandaloneImageScale().upscale(small, "bilinear", 20, 0, "disabled")[0]
    assert scaled.shape == (1, 24, 20, 3)


def test_runner_errors_name_the_problem(models_dir, tmp_path):
    with pytest.raises(ValueError, match="API-format"):
        runner.run_workflow({"nodes": [], "links": []})
    with pytest.raises(ValueError, match="KSampler"):
        runner.run_workflow({"1": {"class_type": "KSampler", "inputs": {}}})
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": "bd_scene.png"}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 5], "filename_prefix": "x"}}}
    with pytest.raises(ValueError, match="output 5"):
        runner.run_workflow(wf, output_dir=tmp_path)
    with pytest.raises(ValueError, match="node '7'"):
        runner.run_workflow(wf, output_dir=tmp_path, overrides={"7": {"x": 1}})
    res = runner.run_workflow(wf, output_dir=tmp_path, overrides={"2": {"images": ["1", 0]}})
    assert wf["2"]["inputs"]["images"] == ["1", 5]  # the caller's workflow is left as it was
    assert [p.name for p in res.files] == ["x_00001_.png"] and res.ui["2"]["images"][0]["filename"] == "x_00001_.png"


def test_loaders_download_a_missing_official_file_on_first_use(ckpt_dir, tmp_path, monkeypatch):
    """Issue 13: LoadCLIP / LoadDDPM fetch an absent official file into an empty models folder (from a local
    server here), checked by sha256; BLENDED_DIFFUSION_OFFLINE=1 refuses with the URL and the folder instead."""
    from local_http import official_from, serve
    served, models = tmp_path / "served", tmp_path / "models"
    served.mkdir()
    (served / "ViT-B-16.pt").write_bytes((ckpt_dir / "ViT-B-16.pt").read_bytes())
    (served / "512x512_diffusion.pt").write_bytes((ckpt_dir / "64x64_classes.pt").read_bytes())
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(models))
    loaders.clear_cache()
    assert host.list_models("clip_guidance") == [] and "ViT-B-16.pt" in \
        N["LoadCLIP"].INPUT_TYPES()["required"]["clip_name"][0]
    with serve(served) as url:
        w = official_from(monkeypatch, "clip", served / "ViT-B-16.pt", url)
        official_from(monkeypatch, "ddpm_512", served / "512x512_diffusion.pt", url)
        monkeypatch.setenv("BLENDED_DIFFUSION_OFFLINE", "1")
        with torch.inference_mode(), pytest.raises(RuntimeError) as e:
            N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")
        assert w.url in str(e.value) and str(models / "clip_guidance") in str(e.value)
        assert not (models / "clip_guidance").exists() or not any((models / "clip_guidance").iterdir())
        monkeypatch.delenv("BLENDED_DIFFUSION_OFFLINE")
        with torch.inference_mode():
            clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
            ddpm = N["LoadDDPM"]().load("512x512_diffusion.pt", "10", "fp32")[0]
    assert (models / "clip_guidance" / "ViT-B-16.pt").read_bytes() == (served / "ViT-B-16.pt").read_bytes()
    assert host.list_models("ddpm") == ["512x512_diffusion.pt"] and ddpm.image_size == 64
    assert clip.path == str(models / "clip_guidance" / "ViT-B-16.pt")
    assert not list(models.rglob("*.part"))
    with pytest.raises(FileNotFoundError, match="ddpm"):   # an unknown file is never fetched
        N["LoadDDPM"]().load("not_official.pt")
    loaders.clear_cache()
