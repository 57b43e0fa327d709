"""Tiny in-process ComfyUI models (no file) for fast node tests: SD1.5, SDXL and SD2.x v-prediction.

Each builder returns what Load Checkpoint would: a ``ModelPatcher`` around ComfyUI's own model class, a
``comfy.sd.CLIP`` with the family's own tokenizer and text-model classes (tiny text configs through ComfyUI's
``<name>_model_config`` model options), and a ``comfy.sd.VAE`` around a 32-channel AutoencoderKL (8x
downsampling). Weights are seeded (tests/tiny_sd.py's ``_randomize``: ComfyUI's layers skip weight init), with
a small UNet output layer (eps varies smoothly, DDIM inversion at guidance 1 is near exact) and strong
cross-attention values (the text matters). Build them inside ``torch.inference_mode()``, as ComfyUI does.

- ``tiny_sd15()``: comfy.supported_models.SD15 / model_base.BaseModel (EPS), a 2-level 32-channel UNet with
  conv projections and context 64, the SD1 tokenizer and a 2-layer 64-wide CLIP-L (tests/test_nulltext_nodes.py's
  models).
- ``tiny_sdxl()``: comfy.supported_models.SDXL / model_base.SDXL (EPS), a 3-level 32/64-channel UNet with linear
  projections, context 128 (the 64-wide CLIP-L's and the 64-wide CLIP-G's hidden states side by side, as
  SDXL's 768 + 1280) and adm_in_channels 1600 = CLIP-G's 64-wide projected pooled output + 6·256 (SDXL's
  size / crop embedding); ComfyUI's SDXL tokenizer and SDXLClipModel (CLIP-L and CLIP-G 3 layers, 64 wide).
- ``tiny_sd2v()``: comfy.supported_models.SD20 / model_base.BaseModel with model_type V_PREDICTION, the same
  UNet as tiny_sdxl's without adm and with context 64; ComfyUI's SD2 tokenizer and SD2ClipModel (OpenCLIP-H
  layout, 3 layers, 64 wide).

ComfyUI must already be importable (tests/comfy_env.py's ``load_comfyui`` or tiny_sd.import_comfy()).
"""
from __future__ import annotations

import torch

import tiny_sd

UNET_SCALES = tiny_sd.UNET_SCALES
TEXT = dict(tiny_sd.TINY_TEXT)
# SDXL's and SD2's text encoders give the penultimate layer's output (layer_idx -2; ComfyUI asserts it is less
# than the layer count in magnitude): 3 layers
TEXT3 = dict(TEXT, num_hidden_layers=3)
VAE_SIZE = 64
VAE_CFG = {"ddconfig": dict(tiny_sd.TINY_VAE, resolution=VAE_SIZE), "embed_dim": 4}
# linear transformer projections (SDXL and SD2.x), 16-channel heads (2 at 32 channels, 4 at 64); three levels
# (8x8, 4x4, 2x2 at 64 px) with a transformer on each, so that prompt-to-prompt's self-attention injection and
# local blending, which act on layers of at most 1/16 of the latent's pixels, have a layer to act on
TINY_LINEAR_UNET = dict(tiny_sd.TINY_UNET, use_linear_in_transformer=True, num_res_blocks=[1, 1, 1],
                        channel_mult=[1, 2, 2], transformer_depth=[1, 1, 1],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1])
HEAD_CHANNELS = 16
SDXL_SIZE_EMBED = 6 * 256  # model_base.SDXL.encode_adm: height, width, crop_h, crop_w, target h and w, 256 each
TINY_SDXL_UNET = dict(TINY_LINEAR_UNET, context_dim=2 * TEXT["hidden_size"], num_classes="sequential",
                      adm_in_channels=TEXT["projection_dim"] + SDXL_SIZE_EMBED)
TINY_SD2_UNET = dict(TINY_LINEAR_UNET, context_dim=TEXT["hidden_size"])


def randomize(module: torch.nn.Module, seed: int, scales: dict | None = None) -> None:
    tiny_sd._randomize(module, torch.Generator().manual_seed(seed), scales)


def _patcher(base):
    import comfy.model_management as mm
    import comfy.model_patcher
    randomize(base.diffusion_model, 0, UNET_SCALES)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _clip(tokenizer, model, **configs):
    import comfy.sd
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(tokenizer, model)
    clip = comfy.sd.CLIP(target, model_options={f"{name}_model_config": dict(cfg) for name, cfg in configs.items()})
    randomize(clip.cond_stage_model, 1)
    return clip


def tiny_vae():
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = AutoencoderKL(**VAE_CFG)
    randomize(ae, 2)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": VAE_CFG})


def tiny_sd15():
    """(MODEL, CLIP, VAE): a tiny SD1.5 (EPS)."""
    import comfy.sd1_clip
    import comfy.supported_models
    cfg = comfy.supported_models.SD15(dict(tiny_sd.TINY_UNET))
    cfg.unet_config["num_heads"] = 2
    cfg.set_inference_dtype(torch.float32, None)
    model = _patcher(cfg.get_model({}))
    return model, _clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, clip_l=TEXT), tiny_vae()


def tiny_sdxl(depth: int = 1):
    """(MODEL, CLIP, VAE): a tiny SDXL (model_base.SDXL, EPS) with both text encoders and the adm vector;
    ``depth`` transformer blocks per attention layer (SDXL's own have 2 and 10)."""
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.supported_models
    unet = dict(TINY_SDXL_UNET, transformer_depth=[depth] * 3, transformer_depth_output=[depth] * 6,
                transformer_depth_middle=depth)
    cfg = comfy.supported_models.SDXL(unet)
    cfg.unet_config["num_head_channels"] = HEAD_CHANNELS
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    assert type(base) is comfy.model_base.SDXL
    clip = _clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, clip_l=TEXT3, clip_g=TEXT3)
    return _patcher(base), clip, tiny_vae()


def tiny_sd2v():
    """(MODEL, CLIP, VAE): a tiny SD2.x v-prediction model (SD20 config, model_type V_PREDICTION)."""
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip as sd2_clip
    cfg = comfy.supported_models.SD20(dict(TINY_SD2_UNET))
    cfg.unet_config["num_head_channels"] = HEAD_CHANNELS
    cfg.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)
    clip = _clip(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel, clip_h=TEXT3)
    return _patcher(base), clip, tiny_vae()


BUILDERS = {"SD15": tiny_sd15, "SDXL": tiny_sdxl, "SD2V": tiny_sd2v}
