"""DINO ViT (Caron et al. 2021) for PIE-Bench's structure distance: the keys of the last block.

Loads the published DINO backbone weights (``dino_vitb8_pretrain.pth`` is what PIE-Bench uses; ViT-S/B with
patch 8 or 16 all load): a plain state dict with ``cls_token``, ``pos_embed``, ``patch_embed.proj.*`` and
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`` (timm's ViT names, which DINO's code uses;
``backbone.`` / ``module.`` prefixes are stripped, a ``head.`` is ignored). The
architecture (width, depth, patch size, heads of 64 channels) is read off the weights. Safe loading only.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, describe, read_state_dict

log = logging.getLogger(__name__)
EXPECTED = "a DINO ViT backbone such as dino_vitb8_pretrain.pth"


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.qkv(self.norm1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoViT(nn.Module):
    def __init__(self, dim: int, depth: int, patch: int, grid: int, hidden: int, qkv_bias: bool = True):
        super().__init__()
        self.patch, self.grid = patch, grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(_Block(dim, max(1, dim // 64), hidden, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @property
    def device(self) -> torch.device:
        return self.cls_token.device

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images → [B, 1 + h·w, D] (patch tokens after the class token), with the
        position embedding resized (bicubic) for another grid than the trained one."""
        p = self.patch_embed.proj(x)
        h, w = p.shape[-2:]
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), p.flatten(2).transpose(1, 2)], dim=1)
        return t + pos

    def last_keys(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention keys, heads concatenated: [B, 1 + h·w, D]."""
        t = self.tokens(x)
        for block in self.blocks[:-1]:
            t = block(t)
        d = t.shape[-1]
        return self.blocks[-1].qkv(t)[..., d:2 * d]


def _backbone(sd: dict) -> dict:
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd if not k.startswith("head.")):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def load_dino(path: str, device="cpu") -> DinoViT:
    """Load a DINO ViT backbone (see the module docstring) in fp32."""
    sd = _backbone(read_state_dict(path, EXPECTED))
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise CheckpointError(f"{path}: this is {describe(sd)}, not {EXPECTED}")
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    with torch.inference_mode(False):
        model = DinoViT(dim, depth, patch, grid, hidden, qkv_bias="blocks.0.attn.qkv.bias" in sd)
        try:
            model.load_state_dict({k: v.float() for k, v in sd.items()})
        except RuntimeError as e:
            raise CheckpointError(f"{path}: unknown DINO architecture ({str(e).splitlines()[0][:200]}); "
                                  f"expected {EXPECTED}") from None
        model = model.eval().requires_grad_(False).to(device)
    log.info("loaded DINO %s: ViT width %d, %d blocks, patch %d", path, dim, depth, patch)
    return model
