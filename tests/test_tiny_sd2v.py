"""tests/tiny_sd.py's tiny SD2.x v-prediction checkpoint (original single-file layout) through ComfyUI's own
loader, and an inversion and edit on it (issue 14).

``comfy.sd.load_checkpoint_guess_config`` (core CheckpointLoaderSimple) must detect it as
``comfy.supported_models.SD20`` with model_type V_PREDICTION (read, as for the real 768-v files, from the std of
``output_blocks.11.1.transformer_blocks.0.norm1.bias``) and fill every weight of the UNet, the OpenCLIP ViT-H text
encoder and the VAE from it. Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout importable by this
interpreter:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_tiny_sd2v.py
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from comfy_env import load_comfyui

load_comfyui("the tiny SD2-v checkpoint tests")
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import comfy.latent_formats  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

import ckpt_checks as cc  # noqa: E402  (tests/ is on sys.path)
import tiny_sd  # noqa: E402
from blended_diffusion.models.inversion import METHODS  # noqa: E402

log = logging.getLogger(__name__)
P = tiny_sd.SD2_PREFIXES
Hh = P["clip_h"]
MARKER = P["unet"] + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    t = time.perf_counter()
    path = tiny_sd.write_sd2v_checkpoint(tmp_path_factory.mktemp("tiny_sd2v") / "tiny_sd2v.safetensors")
    log.warning("tiny SD2-v checkpoint written in %.1f s (%.2f GB)", time.perf_counter() - t, path.stat().st_size / 1e9)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    out = cc.load_logged(ckpt)
    log.warning("tiny SD2-v checkpoint loaded by ComfyUI in %.1f s", out[4])
    return out


@pytest.fixture(scope="module")
def tensors(ckpt):
    from safetensors.torch import load_file
    return load_file(str(ckpt))


def test_file_is_the_original_sd2_layout(tensors):
    sd = tensors
    prefixes = tuple(P.values())
    assert all(k.startswith(prefixes) for k in sd), [k for k in sd if not k.startswith(prefixes)][:5]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert all(torch.isfinite(v).all() for v in sd.values())
    n = {name: sum(v.numel() for k, v in sd.items() if k.startswith(p)) for name, p in P.items()}
    # the full OpenCLIP ViT-H text tower (24 layers, width 1024, with text_projection and logit_scale); SD's VAE
    assert n["clip_h"] == 354_032_641 and n["vae"] == 83_653_863 and n["unet"] == 95_547_204, n
    assert sd[Hh + "transformer.resblocks.23.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    assert not any(k.startswith(Hh + "transformer.resblocks.24.") for k in sd)
    assert sd[Hh + "text_projection"].shape == (1024, 1024) and sd[Hh + "token_embedding.weight"].shape == (49408, 1024)
    assert sd[P["unet"] + "input_blocks.9.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert sd[P["unet"] + "input_blocks.9.1.proj_in.weight"].ndim == 2  # linear projections
    # v-prediction is marked as in real SD2.x 768-v files: no v_pred key, ComfyUI's norm1.bias test
    assert "v_pred" not in sd and sd[MARKER].float().std(unbiased=False) > 0.09
    assert not any(k.startswith(P["unet"] + "output_blocks.12.") for k in sd)


def test_comfyui_loads_it_as_sd2_v_prediction_with_every_weight(tensors, loaded):
    model, clip, vae, records, _ = loaded
    base = model.model
    assert type(base) is comfy.model_base.BaseModel and type(base.model_config) is comfy.supported_models.SD20
    assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert isinstance(base.model_sampling, comfy.model_sampling.V_PREDICTION)
    cfg = base.model_config.unet_config
    assert {k: cfg[k] for k in tiny_sd.SD2_UNET_CONFIG} == tiny_sd.SD2_UNET_CONFIG
    assert cfg["num_head_channels"] == 64
    assert isinstance(base.latent_format, comfy.latent_formats.SD15)
    assert isinstance(vae.first_stage_model, AutoencoderKL) and vae.downscale_ratio == 8
    assert type(clip.cond_stage_model).__name__ == "SD2ClipModel"
    cc.check_every_weight_loaded(tensors, loaded, (Hh,), set())


def test_the_same_file_without_the_marker_is_eps(tensors, tmp_path):
    """The v-prediction decision is the marker's: with its bias zeroed ComfyUI loads the same UNet as EPS."""
    import comfy.model_detection
    sd = {k: v for k, v in tensors.items() if k.startswith(P["unet"])}
    cfg = comfy.model_detection.model_config_from_unet(sd, P["unet"])
    assert type(cfg) is comfy.supported_models.SD20
    assert cfg.model_type(sd, P["unet"]) == comfy.model_base.ModelType.V_PREDICTION
    sd[MARKER] = torch.zeros_like(sd[MARKER])
    assert cfg.model_type(sd, P["unet"]) == comfy.model_base.ModelType.EPS


def test_outputs_are_finite_and_sane(loaded):
    sd, z, cond, other, eps, eps_other, x = cc.outputs(loaded, cc.image())
    assert (sd.family, sd.cond_kind) == ("SD20/V_PREDICTION", "context")
    assert torch.is_tensor(cond) and cond.shape == (1, 77, 1024) and torch.isfinite(cond).all()
    assert (cond - other).abs().mean() > 0.1
    assert z.shape == (1, 4, cc.H // 8, cc.W // 8) and torch.isfinite(z).all() and 0.2 < z.std() < 3, z.std()
    assert x.shape == (1, cc.H, cc.W, 3) and torch.isfinite(x).all() and x.std() > 0.01
    assert torch.isfinite(eps).all() and eps.std() > 0.005, eps.std()
    # v-prediction: ε = x_in·σ/(σ²+1) + v/sqrt(σ²+1), so the (small, text-dependent) network output v is diluted
    # by the x part (measured: 0.9 % of mean |ε| at t = 500)
    assert (eps - eps_other).abs().mean() > 0.005 * eps.abs().mean(), "eps must depend on the prompt"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_the_edit_nodes_on_the_checkpoint(loaded, method):
    cc.check_inversion_and_edits(loaded, method, "SD20/V_PREDICTION", "context")
