"""Extending augmentations (paper §4.2.2, supplement B.2): N views of the masked x̂0 at CLIP size,
the first unaugmented, the others under a random affine (±15°, ±10% shift, p 0.7) followed by a
random perspective (distortion 0.7, p 0.7), border padding. The parameters follow kornia's
RandomAffine/RandomPerspective; they are drawn from each result's own generator (so result i
depends only on its seed) and the two transforms are composed into one warp (one resampling)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import get_perspective_transform, warp_perspective


@dataclass(frozen=True)
class AugmentSettings:
    num_views: int = 8
    degrees: float = 15.0
    translate: float = 0.1
    affine_p: float = 0.7
    distortion: float = 0.7
    perspective_p: float = 0.7

    def __post_init__(self):
        if self.num_views < 1:
            raise ValueError(f"augmentation views = {self.num_views}: need at least 1 "
                             "(1 = no augmentation, the paper uses 8-16)")


def random_homographies(gen: torch.Generator, n: int, size: int, s: AugmentSettings) -> torch.Tensor:
    """[n, 3, 3] homographies (pixel coordinates of a size×size image); view 0 is the identity.

    Drawn on the generator's device (the engine uses CPU generators, so a seed gives the same
    views on every device); always 13 numbers per view, whatever the settings."""
    u = torch.rand(n, 13, generator=gen, device=gen.device)
    c = (size - 1) / 2
    # affine: rotation about the centre by ±degrees, then a shift of ±translate·size
    a = torch.deg2rad(s.degrees * (2 * u[:, 1] - 1))
    t = s.translate * size * (2 * u[:, 2:4] - 1)
    cos, sin, zero, one = a.cos(), a.sin(), torch.zeros(n), torch.ones(n)
    affine = torch.stack([
        torch.stack([cos, -sin, c - cos * c + sin * c + t[:, 0]], -1),
        torch.stack([sin, cos, c - sin * c - cos * c + t[:, 1]], -1),
        torch.stack([zero, zero, one], -1)], 1)
    # perspective: each corner moves inward by up to distortion·size/2 (kornia's "basic" sampling)
    start = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]],
                         dtype=torch.float32).expand(n, 4, 2)
    sign = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float32)
    end = start + s.distortion * size / 2 * u[:, 5:13].view(n, 4, 2) * sign
    persp = get_perspective_transform(start, end)
    eye = torch.eye(3).expand(n, 3, 3)
    affine = torch.where((u[:, 0] < s.affine_p).view(n, 1, 1), affine, eye)
    persp = torch.where((u[:, 4] < s.perspective_p).view(n, 1, 1), persp, eye)
    mats = persp @ affine
    mats[0] = torch.eye(3)  # the first view is the unaugmented image
    return mats


def extending_augmentations(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """x [B,C,S,S], mats [B,N,3,3] → views [B*N,C,S,S] (item-major), one batched warp."""
    b, n = mats.shape[:2]
    views = x.repeat_interleave(n, dim=0)
    return warp_perspective(views, mats.reshape(b * n, 3, 3).to(x), dsize=x.shape[-2:],
                            padding_mode="border", align_corners=True)
