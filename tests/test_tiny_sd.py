"""tests/tiny_sd.py's random SD1.5 checkpoint through ComfyUI's own loader, and NULL-text inversion on it.

``comfy.sd.load_checkpoint_guess_config`` (what core CheckpointLoaderSimple calls) must detect the file as SD1.5
and fill every weight of the UNet, the text encoder and the VAE from it (ComfyUI's layers skip weight init, so a
tensor it does not find stays uninitialised memory). Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout
importable by this interpreter, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_tiny_sd.py
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file():
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to load the tiny SD checkpoint", allow_module_level=True)
import tiny_sd  # noqa: E402  (tests/ is on sys.path via conftest)

try:
    tiny_sd.import_comfy()
    import comfy.latent_formats
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
except ImportError as e:  # a checkout whose requirements this interpreter lacks
    pytest.skip(f"ComfyUI at {COMFY} does not import here ({e}): run with its interpreter", allow_module_level=True)

from blended_diffusion.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from blended_diffusion.host import sd as host_sd  # noqa: E402

W, H = 96, 64  # 12x8 latents
PROMPT = "a red ball next to a small house"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_sd.write_sd15_checkpoint(tmp_path_factory.mktemp("tiny_sd") / "tiny_sd15.safetensors")


@pytest.fixture(scope="module")
def loaded(ckpt):
    """(model, clip, vae, log records) as CheckpointLoaderSimple gets them (ComfyUI runs nodes in inference mode)."""
    handler, root = Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return model, clip, vae, handler.records


@pytest.fixture(scope="module")
def image():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    img = torch.stack([xx, yy, 1 - (xx + yy) / 2], -1)[None] * 0.8 + 0.1
    img[:, 16:48, 30:60] = torch.tensor([0.9, 0.2, 0.2])
    return img


@pytest.fixture(scope="module")
def tensors(ckpt):
    from safetensors.torch import load_file
    return load_file(str(ckpt))


def test_file_is_the_original_single_file_layout(tensors):
    sd = tensors
    prefixes = (tiny_sd.UNET_PREFIX, tiny_sd.CLIP_PREFIX, tiny_sd.VAE_PREFIX)
    assert all(k.startswith(prefixes) for k in sd), [k for k in sd if not k.startswith(prefixes)][:5]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert all(torch.isfinite(v).all() for v in sd.values())
    n = {p: sum(v.numel() for k, v in sd.items() if k.startswith(p)) for p in prefixes}
    # the real SD1.5 text encoder (123.06M) and VAE (83.65M); the UNet is 320 channels wide but 3 small levels
    assert n[tiny_sd.CLIP_PREFIX] == 123_060_480 and n[tiny_sd.VAE_PREFIX] == 83_653_863, n
    assert n[tiny_sd.UNET_PREFIX] < 60_000_000, n
    assert sd[tiny_sd.UNET_PREFIX + "input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert sd[tiny_sd.CLIP_PREFIX + "embeddings.token_embedding.weight"].shape == (49408, 768)


def test_comfyui_loads_it_as_sd15_with_every_weight(tensors, loaded):
    model, clip, vae, records = loaded
    base = model.model
    assert type(base) is comfy.model_base.BaseModel
    assert type(base.model_config) is comfy.supported_models.SD15
    cfg = base.model_config.unet_config
    assert {k: cfg[k] for k in tiny_sd.UNET_CONFIG} == tiny_sd.UNET_CONFIG
    assert cfg["num_heads"] == 8 and cfg["num_head_channels"] == -1
    assert isinstance(base.latent_format, comfy.latent_formats.SD15)
    assert clip is not None and vae is not None
    assert isinstance(vae.first_stage_model, AutoencoderKL) and vae.downscale_ratio == 8
    # no "unet missing/unexpected", "Missing VAE keys" or "clip missing" (beyond what real SD1.x files lack)
    text = [r.getMessage() for r in records]
    bad = [t for t in text if t.startswith(("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE"))]
    assert not bad, bad
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING], "loader warnings"
    # every tensor of the file is in the loaded modules, equal, and the modules have nothing else
    sd = tensors
    parts = {
        tiny_sd.UNET_PREFIX: base.diffusion_model.state_dict(),
        tiny_sd.VAE_PREFIX: vae.first_stage_model.state_dict(),
        tiny_sd.CLIP_PREFIX: {k[len("clip_l.transformer.text_model."):]: v
                              for k, v in clip.cond_stage_model.state_dict().items()
                              if k.startswith("clip_l.transformer.text_model.")},
    }
    for prefix, loaded_sd in parts.items():
        written = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        assert set(loaded_sd) == set(written), (prefix, sorted(set(loaded_sd) ^ set(written))[:10])
        for k, v in written.items():
            assert torch.equal(loaded_sd[k].float().cpu(), v.float()), prefix + k
    rest = set(clip.cond_stage_model.state_dict()) - {f"clip_l.transformer.text_model.{k}" for k in parts[
        tiny_sd.CLIP_PREFIX]}
    assert rest == {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}, rest  # as for real SD1.5


def test_outputs_are_finite_and_sane(loaded, image):
    model, clip, vae, _ = loaded
    with torch.inference_mode():
        cond = host_sd.encode_text(clip, PROMPT)
        other = host_sd.encode_text(clip, "a blue cube under a tall tree")
        sd = host_sd.SDModel(model)
        z = sd.base.process_latent_in(vae.encode(image).float())
        x = vae.decode(sd.base.process_latent_out(z))
        t = torch.tensor([500])
        eps = sd.eps(z, t, cond.to(sd.device))
        eps_other = sd.eps(z, t, other.to(sd.device))
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all() and 0.5 < cond.std() < 2
    assert (cond - other).abs().mean() > 0.1
    assert z.shape == (1, 4, H // 8, W // 8) and torch.isfinite(z).all() and 0.2 < z.std() < 3, z.std()
    assert x.shape == (1, H, W, 3) and torch.isfinite(x).all() and x.std() > 0.01
    assert torch.isfinite(eps).all() and 0.005 < eps.std() < 1, eps.std()  # small: a smooth eps (tiny_sd.UNET_SCALES)
    assert (eps - eps_other).abs().mean() > 0.01 * eps.abs().mean(), "eps must depend on the prompt"


def _run(node_type, **kw):
    cls = NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**kw)
    return out["result"] if isinstance(out, dict) else out


def test_nulltext_inversion_on_the_checkpoint(loaded, image):
    """NULL-text inversion of the loaded SD1.5 (as from CheckpointLoaderSimple): DDIM inversion is near-exact at
    guidance 1, breaks at 7.5, and NULL-text optimisation repairs most of it; the edit keeps the source row."""
    model, clip, vae, _ = loaded
    kw = dict(model=model, clip=clip, vae=vae, image=image, prompt=PROMPT, steps=8, global_null=False)
    reports = {}
    for name, guidance, inner in (("exact", 1.0, 0), ("plain", 7.5, 0), ("nulltext", 7.5, 10)):
        inv, recon, report = _run("NullTextInvert", guidance=guidance, inner_steps=inner, **kw)
        reports[name] = json.loads(report)
        assert recon.shape == (1, H, W, 3) and torch.isfinite(recon).all()
    mse = {k: r["latent_mse"] for k, r in reports.items()}
    assert all(math.isfinite(v) for v in mse.values()), mse
    assert mse["plain"] > 10 * mse["exact"] and mse["nulltext"] < 0.2 * mse["plain"], mse
    (out,) = _run("NullTextEdit", model=model, clip=clip, vae=vae, inversion=inv,
                  target_prompt="a red cube next to a small house", mode="replace", cross_replace_steps=0.8,
                  self_replace_steps=0.4, reweight_words="", reweight_factor=1.0, guidance=7.5, blend_words="")
    assert out.shape == (2, H, W, 3)
    assert (out[0] - recon[0]).abs().max() < 1e-3 and (out[1] - out[0]).abs().max() > 1e-3
