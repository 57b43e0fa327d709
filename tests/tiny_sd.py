"""Small, randomly initialised Stable Diffusion 1.x, SDXL and SD2.x v-prediction checkpoints in the real
single-file format.

``write_sd15_checkpoint(path)`` writes one ``.safetensors`` with the original LDM key names
(``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``, ``first_stage_model.*``) that
ComfyUI's ``comfy.sd.load_checkpoint_guess_config`` (what core ``CheckpointLoaderSimple`` calls) detects as
``comfy.supported_models.SD15`` and loads with every tensor present. What ComfyUI fixes, and so what is
full size here:

- UNet: SD15 is matched on model_channels 320, context_dim 768 and conv (not linear) transformer
  projections, with 8 heads; the rest is read from the keys, so the UNet is small: three levels of 320
  channels (channel_mult [1, 1, 1], one res block each) with a transformer only at the lowest resolution
  (so prompt-to-prompt's self-attention injection, which works on layers of at most 1/16 of the latent's
  pixels, has a layer to act on), and the middle block (res, transformer, res);
- text encoder: CLIP ViT-L/14's (12 layers, width 768, vocabulary 49408, from sd1_clip_config.json), all of
  it, because ComfyUI's layers skip weight initialisation (a missing tensor would be uninitialised memory);
  like real SD1.x files there is no text_projection (the pooled output is unused by SD1.x);
- VAE: ComfyUI's default SD1.x AutoencoderKL (ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, 8x
  downsampling). ComfyUI picks ch_mult [1, 2, 4] (the x4 upscaler's VAE, 4x downsampling) when the
  last level's keys are absent; that is not an SD1.x VAE, so it is not used.

Weights: seeded, fan-in scaled normal matrices/kernels/embeddings, norm scales 1, biases 0; the UNet's output
layer is small (eps varies smoothly, so DDIM inversion at guidance 1 is near-exact, as with a trained model) and
its cross-attention values are strong (the text matters, so guidance 7.5 breaks plain DDIM inversion, as in the
paper); the VAE encoder's output is scaled by 1/0.18215 so that latents after SD1.x's 0.18215 are of order 1
(std about 0.5). Stored as float16 (as most SD1.5 files are; ComfyUI casts on load). About 0.5 GB: 47.5M UNet,
123.1M text encoder and 83.7M VAE parameters; written in about 10 s on a CPU.

``write_sdxl_checkpoint(path)``: the same for SDXL base, with the original SGM key names
(``model.diffusion_model.*``, ``conditioner.embedders.0.transformer.text_model.*`` for CLIP-L,
``conditioner.embedders.1.model.*`` for OpenCLIP bigG in its own layout: ``transformer.resblocks.N.attn.in_proj_*``,
``text_projection``, ``logit_scale``, ..., ``first_stage_model.*``), mapped by ComfyUI's own
``SDXL.process_clip_state_dict_for_saving`` (the reverse of what its loader does). ComfyUI loads it as
``comfy.supported_models.SDXL`` / ``model_base.SDXL`` (EPS):

- UNet: detection matches model_channels 320, linear transformer projections, context 2048, adm 2816 and the
  input transformer_depth [0, 0, 2, 2, 10, 10] exactly (which also keeps SSD-1B, Vega and KOALA away);
  channel_mult, the output and middle depths are read from the keys, so here: channel_mult [1, 1, 1] (every
  level 320 wide), 2 res blocks per level, one transformer in each output block of the lowest level, a 1-block
  middle transformer: 149.6M parameters (the real one: 2.57G);
- text encoders: the full CLIP-L (123.1M, no text_projection, as real SDXL files) and CLIP-G (694.7M with its
  text_projection, so the pooled output that goes into SDXL's adm vector is a real projection);
- VAE: ComfyUI's default AutoencoderKL (83.7M; latent format SDXL, scale 0.13025, so the encoder's output is
  scaled by 1/0.13025).
About 2.1 GB (1051M parameters); built and written in 11-50 s on the shared 2-core test machine (quiet vs. busy),
loaded by ComfyUI in 7-17 s (idle vs. busy machine).

``write_sd2v_checkpoint(path)``: SD2.x v-prediction (``model.diffusion_model.*``, ``cond_stage_model.model.*``
(OpenCLIP ViT-H, 24 layers, width 1024: 354.0M, full size), ``first_stage_model.*``), loaded as
``comfy.supported_models.SD20`` with model_type V_PREDICTION. SD20 is matched on context 1024, model_channels
320 and linear projections; ComfyUI decides v-prediction from the std of
``output_blocks.11.1.transformer_blocks.0.norm1.bias`` (> 0.09), as for the real 768-v files (which carry no
``v_pred`` key), so the UNet must have an output block 11 with a transformer, i.e. (res blocks + 1) x levels
>= 12 output blocks; exactly 12 here: three 320-wide levels with 3 res blocks each, transformers on
the lowest level (input, middle, output: the 1/16-of-the-pixels layers prompt-to-prompt's self-attention
injection acts on) and on output block 11, whose norm1.bias is drawn with std 0.2: 95.5M parameters. About
1.07 GB (533M parameters); built and written in 7-27 s (quiet vs. busy machine), loaded in 3-7 s.

ComfyUI is imported only inside the functions (this module is imported by test files that skip without it):
the ``comfy`` package must be importable, or ``COMFYUI_PATH`` must name a checkout (it is then put on
``sys.path``; on a machine without CUDA ``--cpu`` is set before ``comfy.model_management`` is first imported,
as ComfyUI's ``main.py --cpu`` would).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# What ComfyUI's model_detection.detect_unet_config reads back from the keys (the SD15 model config then adds
# num_heads 8, num_head_channels -1).
UNET_CONFIG = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
               "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
               "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 0, 1],
               "transformer_depth_output": [0, 0, 0, 0, 1, 1], "channel_mult": [1, 1, 1],
               "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
               "use_temporal_resblock": False, "use_temporal_attention": False}
# ComfyUI's default SD1.x/SD2.x VAE (comfy/sd.py VAE.__init__); it is not read from the file.
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
VAE_EMBED_DIM = 4
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."
# multipliers on the random init, by parameter-name prefix or ".<key>" inside the name
UNET_SCALES = {"out.": 0.2, "attn2.to_v": 5.0}
VAE_SCALES = {"encoder.conv_out": 1 / 0.18215}
DTYPE = torch.float16
# SDXL (comfy.supported_models.SDXL, model_base.SDXL): detection matches model_channels 320, linear projections,
# context 2048, adm 2816 and the input transformer_depth exactly; the rest is small: three levels of 320
# channels (channel_mult [1, 1, 1], 2 res blocks each, as SDXL), one transformer in each of the lowest level's
# output blocks (transformer_depth_output is listed from the last output block back, as detection reads it) and
# a 1-block middle transformer. SDXL adds num_head_channels 64 (5 heads at 320).
SDXL_UNET_CONFIG = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
                    "model_channels": 320,
                    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                    "transformer_depth_output": [0, 0, 0, 0, 0, 0, 1, 1, 1], "channel_mult": [1, 1, 1],
                    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
                    "use_temporal_resblock": False, "use_temporal_attention": False}
SDXL_PREFIXES = {"unet": UNET_PREFIX, "clip_l": "conditioner.embedders.0.transformer.text_model.",
                 "clip_g": "conditioner.embedders.1.model.", "vae": VAE_PREFIX}
SDXL_VAE_SCALES = {"encoder.conv_out": 1 / 0.13025}
# SD2.x (comfy.supported_models.SD20): matched on context 1024, model_channels 320, linear projections, no adm;
# v-prediction is read from output block 11's first transformer, so the UNet has 12 output blocks: three levels
# of 320 channels with 3 res blocks each ((3 + 1) x 3 = 12), transformers on the lowest level (input, middle,
# output) and one on output block 11 (the last, full latent resolution). SD20 adds num_head_channels 64.
SD2_UNET_CONFIG = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                   "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                   "num_res_blocks": [3, 3, 3], "transformer_depth": [0, 0, 0, 0, 0, 0, 1, 1, 1],
                   "transformer_depth_output": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], "channel_mult": [1, 1, 1],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
                   "use_temporal_resblock": False, "use_temporal_attention": False}
SD2_PREFIXES = {"unet": UNET_PREFIX, "clip_h": "cond_stage_model.model.", "vae": VAE_PREFIX}
SD2V_NORM1_BIAS_STD = 0.2  # ComfyUI's SD20.model_type: v-prediction when this bias' std > 0.09
# Smaller still, for in-process tests (tests/test_nulltext_nodes.py) and the NULL-text benchmark's tiny
# config: a 2-level 32-channel UNet with context 64, a 2-layer 64-wide text model, a 32-channel 8x VAE.
TINY_UNET = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "num_res_blocks": [1, 1], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
             "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 64, "use_temporal_resblock": False, "use_temporal_attention": False}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
             "projection_dim": 64}
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def import_comfy():
    """The ``comfy`` package (ComfyUI's), made importable from ``COMFYUI_PATH`` if it is not already."""
    try:
        import comfy  # noqa: F401
    except ImportError:
        root = os.environ.get("COMFYUI_PATH", "")
        if not root or not (Path(root) / "comfy").is_dir():
            raise ImportError("tiny_sd needs ComfyUI: set COMFYUI_PATH to a checkout (or put it on sys.path)") \
                from None
        sys.path.append(str(Path(root).resolve()))
    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        from comfy.cli_args import args
        args.cpu = True  # as main.py --cpu: model_management asks CUDA for its device at import
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    return comfy


def _randomize(module: torch.nn.Module, gen: torch.Generator, scales: dict | None = None) -> None:
    """Every parameter a seeded value: fan-in scaled normal for matrices, kernels and embeddings, 1 for the
    (1-D) norm scales, 0 for biases; then the multipliers of ``scales``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
            for key, scale in (scales or {}).items():
                if name.startswith(key) or f".{key}" in name:
                    p.mul_(scale)


def _half(sd: dict, prefix: str) -> dict:
    return {prefix + k: v.detach().to(DTYPE).contiguous() for k, v in sd.items()}


def sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (float16, original LDM key names), built with ComfyUI's own classes."""
    comfy = import_comfy()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.inference_mode(False):
        cfg = comfy.supported_models.SD15(dict(UNET_CONFIG))
        cfg.set_inference_dtype(torch.float32, None)
        unet = cfg.get_model({}).diffusion_model
        _randomize(unet, gen, UNET_SCALES)
        out.update(_half(unet.state_dict(), UNET_PREFIX))
        del unet
        text = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32).transformer.text_model
        _randomize(text, gen)
        out.update(_half(text.state_dict(), CLIP_PREFIX))
        del text
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=VAE_EMBED_DIM)
        _randomize(vae, gen, VAE_SCALES)
        out.update(_half(vae.state_dict(), VAE_PREFIX))
    return out


def _save(sd: dict, path: Path, what: str) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(sd, str(tmp), metadata={"format": "pt", "tiny_sd": what})
    os.replace(tmp, path)
    return path


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the small random SD1.5 checkpoint (.safetensors, float16, about 0.5 GB) to ``path``; returns it.
    The same seed gives the same tensors."""
    return _save(sd15_state_dict(seed), path, f"random SD1.5-format test checkpoint, seed {seed}")


def _unet_and_vae(cfg, gen: torch.Generator, unet_scales: dict, vae_scales: dict, extra=None) -> dict:
    """The UNet of model config ``cfg`` and ComfyUI's default AutoencoderKL, randomised, under ComfyUI's own
    names for saving (``model.diffusion_model.*``, ``first_stage_model.*``), float16. ``extra(unet)`` may
    change the randomised UNet before it is stored."""
    comfy = import_comfy()
    cfg.set_inference_dtype(torch.float32, None)
    unet = cfg.get_model({}).diffusion_model
    _randomize(unet, gen, unet_scales)
    if extra is not None:
        extra(unet)
    out = _half(cfg.process_unet_state_dict_for_saving(unet.state_dict()), "")
    del unet
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=VAE_EMBED_DIM)
    _randomize(vae, gen, vae_scales)
    out.update(_half(cfg.process_vae_state_dict_for_saving(vae.state_dict()), ""))
    return out


def _text(cfg, clip_model: torch.nn.Module, gen: torch.Generator) -> dict:
    """A ComfyUI text-encoder module, randomised, under the checkpoint's names (``cfg``'s own
    ``process_clip_state_dict_for_saving``: OpenCLIP layout for CLIP-G / CLIP-H), float16, without the integer
    ``position_ids`` buffer (ComfyUI's text models have none)."""
    _randomize(clip_model, gen)
    sd = cfg.process_clip_state_dict_for_saving(clip_model.state_dict())
    return _half({k: v for k, v in sd.items() if not k.endswith("position_ids")}, "")


def sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny SDXL checkpoint's tensors (float16, original SDXL key names), built with ComfyUI's classes."""
    comfy = import_comfy()
    import comfy.sdxl_clip
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        cfg = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
        out = _unet_and_vae(cfg, gen, UNET_SCALES, SDXL_VAE_SCALES)
        out.update(_text(cfg, comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32), gen))
    return out


def sd2v_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny SD2.x v-prediction checkpoint's tensors (float16, original SD2 key names), built with ComfyUI's
    classes. V-prediction is marked as in real SD2.x 768-v files: no ``v_pred`` key, the std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` above ComfyUI's 0.09 threshold (SD20.model_type)."""
    comfy = import_comfy()
    import comfy.text_encoders.sd2_clip
    gen = torch.Generator().manual_seed(seed)

    def v_marker(unet):
        with torch.no_grad():
            unet.output_blocks[11][1].transformer_blocks[0].norm1.bias.copy_(
                torch.randn(unet.model_channels, generator=gen) * SD2V_NORM1_BIAS_STD)

    with torch.inference_mode(False):
        cfg = comfy.supported_models.SD20(dict(SD2_UNET_CONFIG))
        out = _unet_and_vae(cfg, gen, UNET_SCALES, VAE_SCALES, v_marker)
        out.update(_text(cfg, comfy.text_encoders.sd2_clip.SD2ClipModel(device="cpu", dtype=torch.float32), gen))
    return out


def write_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL checkpoint (.safetensors, float16, about 2.1 GB) to ``path``; returns it."""
    return _save(sdxl_state_dict(seed), path, f"random SDXL-format test checkpoint, seed {seed}")


def write_sd2v_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny SD2.x v-prediction checkpoint (.safetensors, float16, about 1 GB) to ``path``; returns it."""
    return _save(sd2v_state_dict(seed), path, f"random SD2.x v-prediction test checkpoint, seed {seed}")


WRITERS = {"sd15": write_sd15_checkpoint, "sdxl": write_sdxl_checkpoint, "sd2v": write_sd2v_checkpoint}


if __name__ == "__main__":  # python tests/tiny_sd.py PATH [SEED], with an interpreter that can import ComfyUI
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("seed", type=int, nargs="?", default=0)
    ap.add_argument("--kind", choices=sorted(WRITERS), default="sd15")
    a = ap.parse_args()
    WRITERS[a.kind](a.path, a.seed)
