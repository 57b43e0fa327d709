"""Every inversion method and every edit node on tiny in-process SDXL and SD2.x v-prediction models (issue 14).

The models are tests/tiny_models.py's: ComfyUI's own classes (model_base.SDXL with both text encoders and the adm
vector; SD20 with model_type V_PREDICTION), tiny and random. Skips unless ``COMFYUI_PATH`` names a ComfyUI
checkout importable by this interpreter:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_tiny_families.py
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from comfy_env import load_comfyui

load_comfyui("the SDXL / SD2-v node tests")
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import folder_paths  # noqa: E402

import tiny_models  # noqa: E402  (tests/ is on sys.path)
from blended_diffusion.host import sd as host_sd  # noqa: E402
from blended_diffusion.models import cond as cond_mod  # noqa: E402
from blended_diffusion.models import p2p  # noqa: E402
from blended_diffusion.models.cond import Cond  # noqa: E402
from blended_diffusion.models.inversion import METHODS  # noqa: E402
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

STEPS, INNER = 6, 10
PROMPT = "a photo of a cat"
SIZE = tiny_models.VAE_SIZE
FAMILIES = {"SDXL": ("SDXL/EPS", "context+y"), "SD2V": ("SD20/V_PREDICTION", "context")}


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    with torch.inference_mode():
        return {name: tiny_models.BUILDERS[name]() for name in FAMILIES}


@pytest.fixture(scope="module")
def image():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    img = torch.stack([xx, yy, 1 - (xx + yy) / 2], -1)[None] * 0.8 + 0.1
    img[:, 20:44, 24:40] = torch.tensor([0.9, 0.2, 0.2])
    return img


def run(node_type, **kw):
    cls = NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**kw)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def inversions(models, image):
    """(family, method, inner_steps) -> (inversion, reconstruction, report), made once."""
    cache = {}

    def get(family, method, inner=INNER, guidance=7.5):
        key = (family, method, inner, guidance)
        if key not in cache:
            model, clip, vae = models[family]
            inv, recon, report = run("NullTextInvert", model=model, clip=clip, vae=vae, image=image, prompt=PROMPT,
                                     steps=STEPS, guidance=guidance, inner_steps=inner, global_null=False,
                                     method=method)
            cache[key] = inv, recon, json.loads(report)
        return cache[key]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_model_family_and_conditioning(models, family):
    model, clip, _ = models[family]
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        z = torch.zeros(1, 4, 8, 12)
        c, other = sd.condition(clip, PROMPT, z), sd.condition(clip, "a photo of a dog", z)
        c_big = sd.condition(clip, PROMPT, torch.zeros(1, 4, 16, 12))
    assert (sd.family, sd.cond_kind) == FAMILIES[family]
    if family == "SDXL":
        # both encoders' hidden states side by side; y = CLIP-G's projected pooled output + 6 x 256 size embedding
        assert isinstance(c, Cond) and c.context.shape == (1, 77, 128) and c.y.shape == (1, 64 + 1536)
        assert not torch.equal(c.y[:, :64], other.y[:, :64]), "the pooled part must depend on the prompt"
        assert torch.equal(c.y[:, 64:], other.y[:, 64:]), "the size part must not"
        # size conditioning as ComfyUI's sampler builds it: height, width (latent x 8), crops 0, target = size
        size = sd.base.embedder(torch.tensor([64.0, 96.0, 0.0, 0.0, 64.0, 96.0])).flatten()
        assert torch.allclose(c.y[0, 64:], size.float(), atol=1e-6)
        assert not torch.equal(c_big.y[:, 64:], c.y[:, 64:])
    else:
        assert torch.is_tensor(c) and c.shape == (1, 77, 64)
        assert sd.base.model_type.name == "V_PREDICTION"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_inverts(inversions, family):
    _, _, plain = inversions(family, "null-text", 0)
    _, _, exact = inversions(family, "null-text", 0, 1.0)
    # guidance 7.5 breaks plain DDIM inversion, guidance 1 barely (a smooth eps: tiny_sd.UNET_SCALES)
    assert plain["latent_mse"] > 10 * exact["latent_mse"], (plain["latent_mse"], exact["latent_mse"])
    mse = {}
    for method in METHODS:
        inv, recon, report = inversions(family, method)
        assert inv.method == report["method"] == method
        assert (inv.family, inv.cond_kind) == FAMILIES[family]
        assert recon.shape == (1, SIZE, SIZE, 3) and torch.isfinite(recon).all()
        assert isinstance(inv.cond, Cond) == (family == "SDXL")
        mse[method] = report["latent_mse"]
        assert math.isfinite(mse[method])
    assert mse["direct"] < 1e-10, mse  # exact: the corrections keep the source on the inversion trajectory
    assert mse["null-text"] < 0.2 * plain["latent_mse"], (mse, plain["latent_mse"])
    assert mse["null-text global"] < plain["latent_mse"], (mse, plain["latent_mse"])
    assert mse["negative-prompt"] < plain["latent_mse"], (mse, plain["latent_mse"])
    npi = inversions(family, "negative-prompt")[0]
    assert cond_mod.equal(npi.nulls[0], npi.cond)  # the source prompt's conditioning as the null text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_and_round_trips(models, inversions, family, method, tmp_path, monkeypatch):
    model, clip, vae = models[family]
    inv, recon, _ = inversions(family, method)
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    (path,) = run("SaveInversion", inversion=inv, filename=f"nulltext/{family}-{method}")
    loaded, source, prompt = run("LoadInversion", filename=path)
    assert prompt == PROMPT and torch.equal(source, inv.source)
    assert (loaded.method, loaded.family, loaded.cond_kind) == (inv.method, inv.family, inv.cond_kind)
    for a, b in zip(loaded.latents + loaded.nulls + [loaded.cond, loaded.uncond],
                    inv.latents + inv.nulls + [inv.cond, inv.uncond]):
        assert cond_mod.equal(a, b)
    kw = dict(model=model, clip=clip, vae=vae, inversion=loaded, guidance=7.5)
    (same,) = run("NullTextSDEdit", target_prompt="", t0=1.0, start="inversion", seed=0, **kw)
    assert (same - recon).abs().max() < 1e-4, "SDEdit from the inversion with the caption is the reconstruction"
    (sde,) = run("NullTextSDEdit", target_prompt="a photo of a dog", t0=0.6, start="inversion", seed=0, **kw)
    assert (sde - recon).abs().max() > 1e-3
    (out,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", cross_replace_steps=0.8,
                 self_replace_steps=0.4, reweight_words="", reweight_factor=1.0, blend_words="", **kw)
    assert out.shape == (2, SIZE, SIZE, 3)
    # the source row (batched through the prompt-to-prompt patch) is the reconstruction up to float rounding
    assert (out[0] - recon[0]).abs().max() < 1e-3, "the p2p source row must be the reconstruction"
    assert (out[1] - out[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_to_prompt_modes(models, inversions, family, monkeypatch):
    """replace, refine, reweight and local blend on the NULL-text inversion: the source row never changes, the
    cross- and self-attention injections change the edit, local blending builds its mask."""
    model, clip, vae = models[family]
    masks = []
    blend_call = p2p.LocalBlend.__call__

    def recording(self, x, i, n):
        out = blend_call(self, x, i, n)
        if self.mask is not None:
            masks.append(self.mask)
        return out
    monkeypatch.setattr(p2p.LocalBlend, "__call__", recording)
    inv, recon, _ = inversions(family, "null-text")
    kw = dict(model=model, clip=clip, vae=vae, inversion=inv, guidance=7.5, cross_replace_steps=0.8,
              self_replace_steps=0.4)
    plain = dict(reweight_words="", reweight_factor=1.0, blend_words="")
    (rep,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", **plain, **kw)
    (free,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", **plain,
                  **dict(kw, cross_replace_steps=0.0, self_replace_steps=0.0))
    (no_self,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", **plain,
                     **dict(kw, self_replace_steps=0.0))
    (ref,) = run("NullTextEdit", target_prompt="a photo of a fluffy cat", mode="refine", **plain, **kw)
    (rew,) = run("NullTextEdit", target_prompt="", mode="reweight", reweight_words="cat", reweight_factor=3.0,
                 blend_words="", **kw)
    (blend,) = run("NullTextEdit", target_prompt="a photo of a dog", mode="replace", reweight_words="",
                   reweight_factor=1.0, blend_words="cat dog", **kw)
    for o in (rep, free, no_self, ref, rew, blend):
        assert o.shape == (2, SIZE, SIZE, 3) and (o[0] - recon[0]).abs().max() < 1e-4
        assert (o[1] - o[0]).abs().max() > 1e-4
    assert (free[1] - no_self[1]).abs().max() > 1e-4, "cross-attention injection must change the edit"
    assert (no_self[1] - rep[1]).abs().max() > 1e-4, "self-attention injection must change the edit"
    # the blend mask is built from the 1/16-size layers' cross-attention, at the latent's size, once per step
    # from blend_start on (with random weights the maps are near uniform and the mask covers the whole latent,
    # so the blended edit is not asserted to differ)
    assert masks and all(m.shape == (1, 1, SIZE // 8, SIZE // 8) for m in masks), [m.shape for m in masks]
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_an_inversion_is_refused_by_the_other_family(models, inversions):
    for made, other in (("SD2V", "SDXL"), ("SDXL", "SD2V")):
        inv = inversions(made, "direct")[0]
        model, clip, vae = models[other]
        want = f"made with a {FAMILIES[made][0]} model"
        with pytest.raises(ValueError, match=want):
            run("NullTextSDEdit", model=model, clip=clip, vae=vae, inversion=inv, target_prompt="a photo of a dog",
                t0=0.6, start="inversion", seed=0, guidance=7.5)
        with pytest.raises(ValueError, match=want):
            run("NullTextEdit", model=model, clip=clip, vae=vae, inversion=inv, target_prompt="a photo of a dog",
                mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4, reweight_words="",
                reweight_factor=1.0, guidance=7.5, blend_words="")


def test_compare_inversion_methods_on_sdxl(models, image, inversions, tmp_path, monkeypatch):
    """Compare Inversion Methods on the tiny SDXL: every method, the CSV's rows, Direct Inversion's exact latent and
    the reconstructions batch; NULL-text's reconstruction is NullTextInvert's."""
    from blended_diffusion.models import compare as cmp
    model, clip, vae = models["SDXL"]
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    fig, text, recons = run("CompareInversionMethods", model=model, clip=clip, vae=vae, image=image, prompt=PROMPT,
                            methods=", ".join(METHODS), steps=STEPS, guidance=7.5, inner_steps=INNER,
                            filename_prefix="cmp/sdxl")
    rows = {r.method: r for r in cmp.read_csv(text)}
    assert list(rows) == ["vae", *METHODS]
    assert (tmp_path / "cmp" / "sdxl_00001.csv").read_text() == text and (tmp_path / "cmp" / "sdxl_00001.png").is_file()
    assert recons.shape == (2 + len(METHODS), SIZE, SIZE, 3) and fig.shape[0] == 1
    assert rows["direct"].latent_mse < 1e-9
    assert rows["direct"].latent_mse == min(r.latent_mse for m, r in rows.items() if m != "vae")
    assert rows["direct"].eps_calls == rows["negative-prompt"].eps_calls == 2 * STEPS
    assert rows["null-text global"].eps_calls == STEPS + 3 * INNER * STEPS + STEPS
    assert torch.allclose(recons[2], inversions("SDXL", "null-text")[1][0], atol=1e-5)
    assert all(math.isfinite(r.lpips) and r.psnr_db > 0 for r in rows.values())
