"""NULL-text nodes (nodes/nulltext.py) on ComfyUI's own MODEL / CLIP / VAE objects.

Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout importable by this interpreter, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_nulltext_nodes.py

The models are tiny and random but built with ComfyUI's classes: an SD1.5 ``BaseModel`` (comfy.supported_models.
SD15 with a 2-level, 32-channel UNet config, context 64) in a ``ModelPatcher``, ``comfy.sd.CLIP`` with the SD1
tokenizer and a 2-layer 64-wide text model, and ``comfy.sd.VAE`` around a 32-channel AutoencoderKL (8x
downsampling), on 64x64 images (8x8 latents). Every node runs under ``torch.inference_mode()`` as in ComfyUI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfy_env import load_comfyui  # noqa: E402

COMFY = str(load_comfyui("the NULL-text node tests"))
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import comfy.model_management  # noqa: E402, F401
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import folder_paths  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

import tiny_sd  # noqa: E402  (tests/ is on sys.path)
from blended_diffusion import host  # noqa: E402
from blended_diffusion.host import sd as host_sd  # noqa: E402
from blended_diffusion.models import nulltext as nt  # noqa: E402
from blended_diffusion.models.fidelity import measure  # noqa: E402
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

STEPS = 10
PROMPT = "a photo of a cat"
SIZE = 64


# --------------------------------------------------------------------------------------------- tiny models
def _randomize(module: torch.nn.Module, seed: int, scales: dict | None = None) -> None:
    """ComfyUI's layers skip weight init: every parameter a seeded value (tests/tiny_sd.py)."""
    tiny_sd._randomize(module, torch.Generator().manual_seed(seed), scales)


# A smooth eps (small output layer: DDIM inversion at guidance 1 is nearly exact, as with a trained model) that
# depends clearly on the text (strong cross-attention values), so guidance 7.5 visibly breaks plain DDIM.
UNET_SCALES = tiny_sd.UNET_SCALES
UNET, TEXT = tiny_sd.TINY_UNET, tiny_sd.TINY_TEXT
VAE_CFG = {"ddconfig": dict(tiny_sd.TINY_VAE, resolution=SIZE), "embed_dim": 4}


def tiny_model():
    cfg = comfy.supported_models.SD15(UNET)
    cfg.unet_config["num_heads"] = 2
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    _randomize(base.diffusion_model, 0, UNET_SCALES)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_clip():
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TEXT)})
    _randomize(clip.cond_stage_model, 1)
    return clip


def tiny_vae():
    ae = AutoencoderKL(**VAE_CFG)
    _randomize(ae, 2)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": VAE_CFG})


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd():
    with torch.inference_mode():  # ComfyUI builds models inside inference mode too
        return tiny_model(), tiny_clip(), tiny_vae()


@pytest.fixture(scope="module")
def image():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    img = torch.stack([xx, yy, 1 - (xx + yy) / 2], -1)[None] * 0.8 + 0.1
    img[:, 20:44, 24:40] = torch.tensor([0.9, 0.2, 0.2])
    return img


def run(node_type, **kw):
    """One node call as ComfyUI makes it: a fresh instance, inside inference mode; {"ui", "result"} unwrapped."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**kw)
    return out["result"] if isinstance(out, dict) else out


def invert(sd, image, **kw):
    """NullTextInvert with the test's defaults: (inversion, reconstruction, report as a dict)."""
    model, clip, vae = sd
    kw = {"prompt": PROMPT, "steps": STEPS, "guidance": 7.5, "inner_steps": 10, "global_null": False, **kw}
    inv, recon, report = run("NullTextInvert", model=model, clip=clip, vae=vae, image=image, **kw)
    return inv, recon, json.loads(report)


@pytest.fixture(scope="module")
def inverted(sd, image):
    return invert(sd, image)


# --------------------------------------------------------------------------------------------- tests
def test_nodes_registered_with_tooltips():
    for name in ("NullTextInvert", "SaveInversion", "LoadInversion", "NullTextEdit", "NullTextSDEdit",
                 "FidelityCurve", "CompareInversionMethods"):
        cls = NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "Blended Diffusion/NULL-text"
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert NODE_CLASS_MAPPINGS["NullTextInvert"].RETURN_TYPES[0] == "BD_INVERSION"
    assert NODE_CLASS_MAPPINGS["NullTextInvert"].INPUT_TYPES()["required"]["model"][0] == "MODEL"


def test_invert_reconstructs_better_than_plain_ddim(sd, image, inverted):
    model, clip, vae = sd
    inv, recon, report = inverted
    assert inv.steps == STEPS and len(inv.nulls) == STEPS and not inv.is_global
    assert inv.latents[0].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert inv.cond.shape == inv.uncond.shape == (1, 77, 64)
    assert not any(t.is_inference() for t in inv.latents + inv.nulls + [inv.cond, inv.uncond])
    assert recon.shape == (1, SIZE, SIZE, 3) and torch.isfinite(recon).all()
    # the same schedule as ComfyUI's own sampler: ᾱ from model_sampling's sigmas
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    assert torch.allclose(inv.alphas_cumprod, 1 / (sigmas ** 2 + 1))
    # plain DDIM inversion at guidance 7.5 (no optimisation: the empty prompt's embedding at every step)
    _, recon_plain, plain = invert(sd, image, inner_steps=0)
    _, _, exact = invert(sd, image, inner_steps=0, guidance=1.0)
    assert plain["latent_mse"] > 10 * exact["latent_mse"], "guidance 7.5 must break plain DDIM reconstruction"
    assert report["latent_mse"] < 0.2 * plain["latent_mse"], (report["latent_mse"], plain["latent_mse"])
    # in pixels, against the VAE's own decoding of the encoded image (the random VAE is no autoencoder, and
    # its decoder amplifies latent errors a lot)
    with torch.inference_mode():
        ref = host_sd.SDModel(model).decode(vae, inv.latents[0])
    assert (recon - ref).abs().mean() < 0.8 * (recon_plain - ref).abs().mean()
    assert len(report["final_losses"]) == STEPS
    assert {"ddim_inversion_s", "null_text_s", "reconstruction_s", "total_s"} <= set(report)
    # the incoming MODEL is left as it was
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_global_null_converges_more_slowly(sd, image, inverted):
    inv_g, _, rep_g = invert(sd, image, global_null=True)
    _, _, plain = invert(sd, image, inner_steps=0)
    assert inv_g.is_global and len(inv_g.nulls) == 1
    assert inverted[2]["latent_mse"] < rep_g["latent_mse"] < plain["latent_mse"]


def test_every_method_inverts_and_edits_on_comfyui_models(sd, image, inverted, tmp_path, monkeypatch):
    """The method input (issue 14): NPI and Direct Inversion on ComfyUI's MODEL, their edits, their files."""
    model, clip, vae = sd
    _, _, plain = invert(sd, image, inner_steps=0)
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    for method in ("negative-prompt", "direct"):
        inv, recon, report = invert(sd, image, method=method)
        assert inv.method == report["method"] == method and "null_text_s" not in report
        assert (inv.family, inv.cond_kind) == ("SD15/EPS", "context")  # refused by other model families
        if method == "direct":  # exact: the corrections keep the source on the inversion trajectory
            assert report["latent_mse"] < 1e-10 and len(inv.corrections) == STEPS
        else:
            assert report["latent_mse"] < plain["latent_mse"] and torch.equal(inv.nulls[0], inv.cond)
        (path,) = run("SaveInversion", inversion=inv, filename=f"nulltext/{method}")
        loaded, _, _ = run("LoadInversion", filename=path)
        assert loaded.method == method and len(loaded.corrections) == len(inv.corrections)
        kw = dict(model=model, clip=clip, vae=vae, inversion=loaded, guidance=7.5)
        (same,) = run("NullTextSDEdit", target_prompt="", t0=1.0, start="inversion", seed=0, **kw)
        assert (same - recon).abs().max() < 1e-4
        (out,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                     self_replace_steps=0.4, reweight_words="", reweight_factor=1.0, blend_words="", **kw)
        # the edit's source row runs in a batch of 4 through the prompt-to-prompt attention patch, the reconstruction
        # in a batch of 1 or 2 through ComfyUI's own attention: float rounding only (1.0e-4 measured in pixels,
        # which the random VAE amplifies; the latents' exactness is tested in test_inversion.py)
        assert (out[0] - recon[0]).abs().max() < 1e-3 and (out[1] - out[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="global_null applies to NULL-text only"):
        invert(sd, image, method="direct", global_null=True)


def test_save_load_round_trip(sd, inverted, tmp_path, monkeypatch):
    model, clip, vae = sd
    inv = inverted[0]
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    (path,) = run("SaveInversion", inversion=inv, filename="nulltext/cat")
    assert Path(path) == tmp_path / "nulltext" / "cat.safetensors" and Path(path).is_file()
    loaded, source, prompt = run("LoadInversion", filename="nulltext/cat")
    assert prompt == PROMPT and torch.equal(source, inv.source)
    assert loaded.steps == inv.steps and loaded.guidance == inv.guidance and loaded.losses == inv.losses
    for a, b in zip(loaded.latents + loaded.nulls + [loaded.cond, loaded.uncond],
                    inv.latents + inv.nulls + [inv.cond, inv.uncond]):
        assert torch.equal(a, b)
    assert torch.equal(loaded.alphas_cumprod, inv.alphas_cumprod)
    # an absolute path works too, and the loaded inversion edits exactly like the original
    (abs_path,) = run("SaveInversion", inversion=inv, filename=str(tmp_path / "elsewhere" / "x"))
    again, _, _ = run("LoadInversion", filename=abs_path)
    kw = dict(model=model, clip=clip, vae=vae, target_prompt="a photo of a dog", t0=0.5, start="inversion",
              seed=0, guidance=7.5)
    (a,) = run("NullTextSDEdit", inversion=inv, **kw)
    (b,) = run("NullTextSDEdit", inversion=again, **kw)
    assert torch.equal(a, b)
    # clear errors
    with pytest.raises(FileNotFoundError, match="Save Inversion"):
        run("LoadInversion", filename="nulltext/missing")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        run("LoadInversion", filename=str(bad))
    with pytest.raises(ValueError, match="output folder"):
        run("SaveInversion", inversion=inv, filename="../outside")


def test_sdedit_from_inversion_with_the_caption_is_the_reconstruction(sd, inverted):
    model, clip, vae = sd
    inv, recon, _ = inverted
    kw = dict(model=model, clip=clip, vae=vae, inversion=inv, guidance=7.5, seed=0)
    (out,) = run("NullTextSDEdit", target_prompt="", t0=1.0, start="inversion", **kw)
    assert (out - recon).abs().max() < 1e-4
    (edit,) = run("NullTextSDEdit", target_prompt="a photo of a dog", t0=0.6, start="inversion", **kw)
    assert (edit - recon).abs().max() > 1e-3
    # plain SDEdit: seeded noise, the empty prompt's embedding
    (p1,) = run("NullTextSDEdit", target_prompt="a photo of a dog", t0=0.6, start="random noise", **kw)
    (p2,) = run("NullTextSDEdit", target_prompt="a photo of a dog", t0=0.6, start="random noise", **kw)
    kw["seed"] = 1
    (p3,) = run("NullTextSDEdit", target_prompt="a photo of a dog", t0=0.6, start="random noise", **kw)
    assert torch.equal(p1, p2) and (p1 - p3).abs().max() > 1e-4 and (p1 - edit).abs().max() > 1e-4


def test_prompt_to_prompt_keeps_the_source_row(sd, inverted):
    model, clip, vae = sd
    inv, recon, _ = inverted
    kw = dict(model=model, clip=clip, vae=vae, inversion=inv, guidance=7.5, reweight_words="",
              reweight_factor=1.0, blend_words="")
    (out,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                 self_replace_steps=0.4, **kw)
    assert out.shape == (2, SIZE, SIZE, 3)
    assert (out[0] - recon[0]).abs().max() < 1e-4, "the source row must be the reconstruction"
    assert (out[1] - out[0]).abs().max() > 1e-3
    # no injection at all = plain sampling of the target from z_T with the null embeddings (= SDEdit t0 = 1)
    (free,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.0,
                  self_replace_steps=0.0, **kw)
    (sde,) = run("NullTextSDEdit", model=model, clip=clip, vae=vae, inversion=inv, target_prompt="a photo of a dog",
                 t0=1.0, start="inversion", seed=0, guidance=7.5)
    assert (free[1] - sde[0]).abs().max() < 1e-4
    assert (free[1] - out[1]).abs().max() > 1e-4, "cross-attention injection must change the edit"
    # refinement, reweighting and local blending run; the source row never changes
    (ref,) = run("NullTextEdit", target_prompt="a photo of a fluffy cat", mode="refine", cross_replace_steps=0.8,
                 self_replace_steps=0.4, **kw)
    kw.update(reweight_words="cat", reweight_factor=3.0)
    (rew,) = run("NullTextEdit", target_prompt="", mode="reweight", cross_replace_steps=0.8,
                 self_replace_steps=0.4, **kw)
    kw.update(reweight_words="", reweight_factor=1.0, blend_words="cat dog")
    (blend,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                   self_replace_steps=0.4, **kw)
    for o in (ref, rew, blend):
        assert o.shape == (2, SIZE, SIZE, 3) and (o[0] - recon[0]).abs().max() < 1e-4
        assert (o[1] - o[0]).abs().max() > 1e-4
    # per-word windows: the default's own window changes nothing; a shorter one for "dog" changes the edit only
    kw.update(blend_words="")
    (same,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                  self_replace_steps=0.4, word_replace_steps="dog: 0.8", **kw)
    (short,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                   self_replace_steps=0.4, word_replace_steps="dog: 0-0.2", **kw)
    assert torch.equal(same, out)
    assert (short[0] - recon[0]).abs().max() < 1e-4 and (short[1] - out[1]).abs().max() > 1e-4
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_prompt_to_prompt_errors(sd, inverted):
    model, clip, vae = sd
    kw = dict(model=model, clip=clip, vae=vae, inversion=inverted[0], cross_replace_steps=0.8,
              self_replace_steps=0.4, reweight_words="", reweight_factor=1.0, guidance=7.5)
    with pytest.raises(ValueError, match="same number of words"):
        run("NullTextEdit", target_prompt="a photo of a big dog", mode="replace", **kw)
    with pytest.raises(ValueError, match="plain prompts"):
        run("NullTextEdit", target_prompt="a photo of a (dog:1.3)", mode="replace", **kw)
    with pytest.raises(ValueError, match="neither prompt"):
        run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", blend_words="tree", **kw)
    with pytest.raises(ValueError, match="word: fraction"):
        run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", word_replace_steps="dog 0.4", **kw)
    with pytest.raises(ValueError, match="not words of the edit prompt"):
        run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", word_replace_steps="tree: 0.4", **kw)


def test_interrupt_mid_inversion_then_next_run_works(sd, image, inverted, monkeypatch):
    model, clip, vae = sd
    real = host.progress
    seen = []

    class Cancelling:
        """host's progress bar, asking for a stop once the inversion has made 3 steps."""

        def __init__(self, total, desc=""):
            self.bar = real(total, desc)

        def update(self, step, preview=None, total=None):
            seen.append(step)
            if step == 3:
                host.request_interrupt()
            self.bar.update(step, preview, total)

        def close(self):
            self.bar.close()

    monkeypatch.setattr(host, "progress", Cancelling)
    kw = dict(model=model, clip=clip, vae=vae, image=image, prompt=PROMPT, steps=STEPS, guidance=7.5,
              inner_steps=10, global_null=False)
    with pytest.raises(host.Interrupted):
        run("NullTextInvert", **kw)
    assert seen == [1, 2, 3], "the stop must come at the next step"
    monkeypatch.setattr(host, "progress", real)
    inv, recon, _ = run("NullTextInvert", **kw)
    assert torch.equal(recon, inverted[1])
    assert all(torch.equal(a, b) for a, b in zip(inv.nulls, inverted[0].nulls))


def test_fidelity_curve(sd, inverted, clip, ddpm, tmp_path, monkeypatch):
    model, sd_clip, vae = sd
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 16:48] = 1
    fig, text, images = run("FidelityCurve", model=model, clip=sd_clip, vae=vae, inversion=inverted[0],
                            guidance_clip=clip, target_prompt="a photo of a dog", t0_values="0.4, 1.0",
                            plain_sdedit=True, seed=0, guidance=7.5, filename_prefix="nulltext/fid",
                            ddpm=ddpm, mask=mask, skip_timesteps="8", num_views=2)
    lines = text.strip().split("\n")
    assert lines[0] == "method,parameter,value,lpips,clip_distance"
    rows = [line.split(",") for line in lines[1:]]
    assert [(r[0], r[2]) for r in rows] == [("SDEdit after NULL-text inversion", "0.4"),
                                            ("SDEdit after NULL-text inversion", "1"),
                                            ("plain SDEdit", "0.4"), ("plain SDEdit", "1"),
                                            ("Blended Diffusion", "8")]
    assert images.shape == (5, SIZE, SIZE, 3)
    # the numbers are the measurements of the returned images
    x = images.movedim(-1, 1)
    with torch.inference_mode():
        again = measure(x, inverted[0].source.movedim(-1, 1), clip, "a photo of a dog", mask)
    for r, (lp, dist) in zip(rows, again):
        assert abs(float(r[3]) - lp) < 1e-4 and abs(float(r[4]) - dist) < 1e-4
    assert fig.shape[0] == 1 and fig.shape[-1] == 3 and fig.std() > 0.01
    assert (tmp_path / "nulltext" / "fid_00001.png").is_file()
    assert (tmp_path / "nulltext" / "fid_00001.csv").read_text() == text


def test_schedule_matches_core_default_for_sd1(sd):
    """ComfyUI's SD1 model_sampling is SD's scaled-linear schedule: the core's default DDIMSchedule."""
    model = sd[0]
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    assert torch.allclose(1 / (sigmas ** 2 + 1), nt.scaled_linear_alphas_cumprod(), rtol=1e-5)


def test_compare_inversion_methods(sd, image, inverted, tmp_path, monkeypatch):
    """Every method on the tiny SD1.5 model: the files, the CSV's columns and rows, Direct Inversion's exact latent,
    the costs, the reconstructions (NULL-text's is NullTextInvert's), and Cancel between steps."""
    from blended_diffusion.models import compare as cmp
    from blended_diffusion.render import TABLE_ROW, TABLE_TOP, table_row_height
    model, clip, vae = sd
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    kw = dict(model=model, clip=clip, vae=vae, image=image, prompt=PROMPT, steps=STEPS, guidance=7.5, inner_steps=10)
    fig, text, recons = run("CompareInversionMethods", methods="null-text, negative-prompt, direct",
                            filename_prefix="nulltext/cmp", **kw)
    lines = text.strip().split("\n")
    assert lines[0] == "method,lpips,psnr_db,seconds,eps_calls,eps_evaluations,latent_mse,psnr_vae_db"
    rows = {r.method: r for r in cmp.read_csv(text)}
    assert list(rows) == ["vae", "null-text", "negative-prompt", "direct"]
    assert (tmp_path / "nulltext" / "cmp_00001.csv").read_text() == text
    assert (tmp_path / "nulltext" / "cmp_00001.png").is_file()
    # the reconstructions: source, VAE round trip, one per method; NULL-text's is NullTextInvert's
    assert recons.shape == (5, SIZE, SIZE, 3)
    assert torch.allclose(recons[0], image[0], atol=1e-6)
    assert torch.allclose(recons[2], inverted[1][0], atol=1e-5)
    assert rows["null-text"].latent_mse == pytest.approx(inverted[0].info["latent_mse"], rel=1e-3)
    # Direct Inversion reconstructs the latent to float tolerance: the best latent error, and the VAE's image
    assert rows["direct"].latent_mse < 1e-9
    assert rows["direct"].latent_mse == min(r.latent_mse for m, r in rows.items() if m != "vae")
    assert rows["direct"].psnr_vae_db > 60 and rows["vae"].psnr_vae_db == float("inf")
    assert rows["vae"].eps_calls == 0 and rows["vae"].latent_mse == 0
    # costs as the README's table gives them: N inversion + N guided steps (NPI: one latent a step, direct: two)
    assert rows["negative-prompt"].eps_calls == rows["direct"].eps_calls == 2 * STEPS
    assert rows["negative-prompt"].eps_evaluations == 2 * STEPS and rows["direct"].eps_evaluations == 3 * STEPS
    assert 4 * STEPS < rows["null-text"].eps_calls <= STEPS * (10 + 2) + 2 * STEPS
    for r in rows.values():
        assert 0 <= r.lpips < 1 and r.psnr_db > 0 and r.seconds >= 0, r
    # the table: the header, then one line (with its thumbnail) per row
    assert fig.shape == (1, TABLE_TOP + TABLE_ROW + 4 * table_row_height(True) + 8, 720, 3)
    # a second run writes the next number
    run("CompareInversionMethods", methods="direct", filename_prefix="nulltext/cmp", **kw)
    assert cmp.read_csv((tmp_path / "nulltext" / "cmp_00002.csv").read_text())[1].method == "direct"
    with pytest.raises(ValueError, match="null-text, null-text global, negative-prompt, direct"):
        run("CompareInversionMethods", methods="direct, ddim", filename_prefix="nulltext/cmp", **kw)
    # Cancel: the comparison stops at the next step
    real, seen = host.progress, []

    class Cancelling:
        def __init__(self, total, desc=""):
            self.bar = real(total, desc)
            assert total == 4 * STEPS

        def update(self, step, preview=None, total=None):
            seen.append(step)
            if step == STEPS + 3:  # inside the second method
                host.request_interrupt()
            self.bar.update(step, preview, total)

        def close(self):
            self.bar.close()

    monkeypatch.setattr(host, "progress", Cancelling)
    with pytest.raises(host.Interrupted):
        run("CompareInversionMethods", methods="negative-prompt, direct", filename_prefix="nulltext/cmp", **kw)
    assert seen == list(range(1, STEPS + 4))
    assert not (tmp_path / "nulltext" / "cmp_00003.csv").exists()
