"""A small, randomly initialised Stable Diffusion 1.x checkpoint in the real single-file format.

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


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the small random SD1.5 checkpoint (.safetensors, float16, about 0.5 GB) to ``path``; returns it.
    The same seed gives the same tensors."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = sd15_state_dict(seed)
    tmp = path.with_name(path.name + ".part")
    save_file(sd, str(tmp), metadata={"format": "pt", "tiny_sd": f"random SD1.5-format test checkpoint, seed {seed}"})
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # python tests/tiny_sd.py PATH [SEED], with an interpreter that can import ComfyUI
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("seed", type=int, nargs="?", default=0)
    a = ap.parse_args()
    write_sd15_checkpoint(a.path, a.seed)
