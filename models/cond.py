"""A model's full conditioning for the latent-diffusion core (models/nulltext.py, models/inversion.py).

SD1.x / SD2.x take one cross-attention context [B, L, D]: the core uses that tensor as it is. SDXL also takes a
vector ``y`` [B, A]: the pooled text embedding and the size/crop conditioning (ComfyUI's ``encode_adm``). ``Cond``
carries both and behaves like the context tensor for what the core does with a conditioning (``.to``, ``.float``,
``.detach``, ``.clone``, ``.expand``, ``.shape``), so the algorithms are written once for either kind; ``cat`` and
``equal`` take both kinds. NULL-text optimises the context only (``with_context``): ``y`` stays the empty
prompt's, as in the paper, where only the text embedding ∅ is optimised.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch


@dataclass(frozen=True)
class Cond:
    """context [B, L, D] (cross-attention) and ``y`` [B, A] (SDXL: pooled output + size embedding) or None."""
    context: torch.Tensor
    y: torch.Tensor | None = None

    def __post_init__(self):
        if self.y is not None and (self.y.ndim != 2 or self.y.shape[0] != self.context.shape[0]):
            raise ValueError(f"conditioning vector y {tuple(self.y.shape)} does not fit the context "
                             f"{tuple(self.context.shape)}: y must be [B, A] with the context's batch")

    # the tensor-like surface the core uses
    @property
    def shape(self) -> torch.Size:
        return self.context.shape

    @property
    def ndim(self) -> int:
        return self.context.ndim

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    def _map(self, fn) -> "Cond":
        return Cond(fn(self.context), None if self.y is None else fn(self.y))

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> "Cond":
        return self._map(lambda t: t.float())

    def detach(self) -> "Cond":
        return self._map(lambda t: t.detach())

    def clone(self) -> "Cond":
        return self._map(lambda t: t.clone())

    def cpu(self) -> "Cond":
        return self._map(lambda t: t.cpu())

    def contiguous(self) -> "Cond":
        return self._map(lambda t: t.contiguous())

    def expand(self, n: int, *_rest) -> "Cond":
        return Cond(self.context.expand(n, -1, -1), None if self.y is None else self.y.expand(n, -1))

    def split(self, size: int) -> list["Cond"]:
        ys = [None] * -(-self.context.shape[0] // size) if self.y is None else self.y.split(size)
        return [Cond(c, y) for c, y in zip(self.context.split(size), ys)]

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda t: t[index])


Conditioning = Union[torch.Tensor, Cond]


def context(c: Conditioning) -> torch.Tensor:
    """The cross-attention context of either kind."""
    return c.context if isinstance(c, Cond) else c


def with_context(c: Conditioning, ctx: torch.Tensor) -> Conditioning:
    """``c`` with its context replaced (a tensor becomes ``ctx``; a Cond keeps its ``y``)."""
    return replace(c, context=ctx) if isinstance(c, Cond) else ctx


def cat(items: Sequence[Conditioning]) -> Conditioning:
    """Concatenate along the batch: tensors with ``torch.cat``; Conds context with context and y with y."""
    if not any(isinstance(c, Cond) for c in items):
        return torch.cat(list(items))
    conds = [c if isinstance(c, Cond) else Cond(c) for c in items]
    has_y = [c.y is not None for c in conds]
    if any(has_y) and not all(has_y):
        raise ValueError("cannot batch conditionings with and without a pooled/size vector y: encode every "
                         "prompt with the same model's text encoder")
    return Cond(torch.cat([c.context for c in conds]), torch.cat([c.y for c in conds]) if all(has_y) else None)


def equal(a: Conditioning, b: Conditioning) -> bool:
    """Same kind, shapes and values."""
    if isinstance(a, Cond) != isinstance(b, Cond):
        return False
    if not isinstance(a, Cond):
        return a.shape == b.shape and torch.equal(a, b)
    if (a.y is None) != (b.y is None):
        return False
    return equal(a.context, b.context) and (a.y is None or equal(a.y, b.y))
