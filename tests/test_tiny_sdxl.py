"""tests/tiny_sd.py's tiny SDXL checkpoint (original single-file layout) through ComfyUI's own loader, and an
inversion and edit on it (issue 14).

``comfy.sd.load_checkpoint_guess_config`` (core CheckpointLoaderSimple) must detect it as
``comfy.supported_models.SDXL`` (not SSD-1B, Vega or KOALA) with ``model_base.SDXL`` and fill every weight of the
UNet, both text encoders and the VAE from it. Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout importable by
this interpreter:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_tiny_sdxl.py

Writing the 2.1 GB file takes about a minute on a 2-core CPU (once per run of this module).
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from comfy_env import load_comfyui

load_comfyui("the tiny SDXL checkpoint tests")
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import comfy.latent_formats  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

import ckpt_checks as cc  # noqa: E402  (tests/ is on sys.path)
import tiny_sd  # noqa: E402
from blended_diffusion.models.inversion import METHODS  # noqa: E402
from blended_diffusion.models.cond import Cond  # noqa: E402

log = logging.getLogger(__name__)
P = tiny_sd.SDXL_PREFIXES
G = P["clip_g"]


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # the 150M UNet and 695M CLIP-G: both cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    t = time.perf_counter()
    path = tiny_sd.write_sdxl_checkpoint(tmp_path_factory.mktemp("tiny_sdxl") / "tiny_sdxl.safetensors")
    log.warning("tiny SDXL checkpoint written in %.1f s (%.2f GB)", time.perf_counter() - t, path.stat().st_size / 1e9)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    out = cc.load_logged(ckpt)
    log.warning("tiny SDXL checkpoint loaded by ComfyUI in %.1f s", out[4])
    return out


@pytest.fixture(scope="module")
def tensors(ckpt):
    from safetensors.torch import load_file
    return load_file(str(ckpt))


def test_file_is_the_original_sdxl_layout(tensors):
    sd = tensors
    prefixes = tuple(P.values())
    assert all(k.startswith(prefixes) for k in sd), [k for k in sd if not k.startswith(prefixes)][:5]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert all(torch.isfinite(v).all() for v in sd.values())
    n = {name: sum(v.numel() for k, v in sd.items() if k.startswith(p)) for name, p in P.items()}
    # full CLIP-L (as in SD1.5, no projection) and OpenCLIP bigG with text_projection and logit_scale; SD's VAE
    assert n["clip_l"] == 123_060_480 and n["clip_g"] == 694_659_841 and n["vae"] == 83_653_863, n
    assert n["unet"] == 149_600_324, n
    # OpenCLIP's own names and shapes for CLIP-G (fused q/k/v, [in, out] text_projection)
    assert sd[G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert sd[G + "transformer.resblocks.31.mlp.c_fc.weight"].shape == (5120, 1280)
    assert sd[G + "text_projection"].shape == (1280, 1280) and sd[G + "text_projection"].std() > 0.01
    assert sd[G + "token_embedding.weight"].shape == (49408, 1280)
    assert sd[G + "positional_embedding"].shape == (77, 1280) and G + "ln_final.weight" in sd
    assert not any(k.startswith(G + "transformer.resblocks.32.") for k in sd)
    assert sd[P["clip_l"] + "encoder.layers.11.self_attn.q_proj.weight"].shape == (768, 768)
    assert sd[P["unet"] + "label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd[P["unet"] + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (320, 2048)
    assert "v_pred" not in sd


def test_comfyui_loads_it_as_sdxl_with_every_weight(tensors, loaded):
    model, clip, vae, records, _ = loaded
    base = model.model
    assert type(base) is comfy.model_base.SDXL and type(base.model_config) is comfy.supported_models.SDXL
    assert base.model_type == comfy.model_base.ModelType.EPS
    cfg = base.model_config.unet_config
    assert {k: cfg[k] for k in tiny_sd.SDXL_UNET_CONFIG} == tiny_sd.SDXL_UNET_CONFIG
    assert cfg["num_head_channels"] == 64
    assert isinstance(base.latent_format, comfy.latent_formats.SDXL) and base.latent_format.scale_factor == 0.13025
    assert isinstance(vae.first_stage_model, AutoencoderKL) and vae.downscale_ratio == 8
    assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
    # real SDXL files lack CLIP-L's projection and logit scale too (unused: SDXL pools CLIP-G)
    cc.check_every_weight_loaded(tensors, loaded, (P["clip_l"], G),
                                 {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"})


def test_outputs_are_finite_and_sane(loaded):
    sd, z, cond, other, eps, eps_other, x = cc.outputs(loaded, cc.image())
    assert (sd.family, sd.cond_kind) == ("SDXL/EPS", "context+y")
    assert isinstance(cond, Cond) and cond.context.shape == (1, 77, 2048) and cond.y.shape == (1, 2816)
    assert torch.isfinite(cond.context).all() and torch.isfinite(cond.y).all()
    # the pooled part of y is CLIP-G's projected output: prompt-dependent; the size part is not
    assert (cond.y[:, :1280] - other.y[:, :1280]).abs().mean() > 0.1 and torch.equal(cond.y[:, 1280:], other.y[:, 1280:])
    assert (cond.context - other.context).abs().mean() > 0.1
    assert z.shape == (1, 4, cc.H // 8, cc.W // 8) and torch.isfinite(z).all() and 0.2 < z.std() < 3, z.std()
    assert x.shape == (1, cc.H, cc.W, 3) and torch.isfinite(x).all() and x.std() > 0.01
    assert torch.isfinite(eps).all() and 0.005 < eps.std() < 1, eps.std()
    assert (eps - eps_other).abs().mean() > 0.01 * eps.abs().mean(), "eps must depend on the prompt"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_the_edit_nodes_on_the_checkpoint(loaded, method):
    cc.check_inversion_and_edits(loaded, method, "SDXL/EPS", "context+y")
