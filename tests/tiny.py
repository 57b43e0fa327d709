"""Tiny random checkpoints in the real on-disk formats (guided-diffusion state dicts, OpenAI CLIP
state dicts / safetensors / TorchScript archives). Nothing in the pack knows they are tiny."""
from __future__ import annotations

import torch
from guided_diffusion.unet import UNetModel
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

UNET_256 = dict(image_size=256, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                attention_resolutions=(32,), channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
                use_scale_shift_norm=True, resblock_updown=True)
UNET_64_CLASSES = dict(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                       attention_resolutions=(2, 8), channel_mult=(1, 2, 3, 4), num_classes=10,
                       num_head_channels=64, use_scale_shift_norm=True, resblock_updown=False,
                       use_new_attention_order=True)


def tiny_unet(cfg=UNET_256, seed=0) -> UNetModel:
    torch.manual_seed(seed)
    m = UNetModel(**cfg)
    with torch.no_grad():  # guided-diffusion zero-inits output convs; give them weights
        for name, p in m.named_parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return m.eval()


def tiny_clip(seed=0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(32, CLIPVisionCfg(layers=1, width=64, patch_size=32, image_size=224),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
                quick_gelu=True).eval()


def save_unet(path, cfg=UNET_256, seed=0):
    sd = tiny_unet(cfg, seed).state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def save_clip(path, fmt="pt", seed=0):
    model = tiny_clip(seed)
    if fmt == "torchscript":
        torch.jit.script(model).save(str(path))
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path
