"""CLIP through open_clip: OpenAI TorchScript archives or OpenAI-format state dicts, architecture
inferred from the weights; differentiable preprocessing; text embeddings cached per prompt."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from open_clip import tokenizer as oc_tokenizer
from open_clip.model import build_model_from_openai_state_dict

from .checkpoint import CheckpointError, describe, read_state_dict
from .memory import out_of_memory

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModel:
    """A CLIP model used as a differentiable loss: images in [-1, 1], embeddings normalised."""

    def __init__(self, model: torch.nn.Module, path: str = "", precision: str = "fp32"):
        self.model = model.eval().requires_grad_(False)
        self.path = path
        self.precision = precision
        self.input_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple)
                              else model.visual.image_size)
        self.context_length = int(model.context_length)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "ClipModel":
        with torch.inference_mode(False):
            self.model.to(device)
            self._text_cache = {k: v.to(device) for k, v in self._text_cache.items()}
        return self

    def thaw(self) -> "ClipModel":
        """Make weights and cached embeddings usable by autograd after inference-mode handling."""
        from .ddpm import thaw, thaw_tensors
        thaw(self.model)
        self._text_cache = thaw_tensors(self._text_cache)
        return self

    def _autocast(self):
        from .ddpm import PRECISIONS
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision],
                              enabled=self.precision != "fp32")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size → CLIP input (resized, mean/std normalised); differentiable."""
        x = (x + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False, antialias=True)
        mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """Embeddings (unit norm, float32) of already-preprocessed images."""
        with self._autocast():
            return F.normalize(self.model.encode_image(x_normalized).float(), dim=-1)

    def encode_text(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding [1, D], cached per prompt."""
        if prompt not in self._text_cache:
            n_tokens = len(oc_tokenizer._tokenizer.encode(prompt)) + 2
            if n_tokens > self.context_length:
                log.warning("prompt is %d tokens, CLIP reads %d: truncated to %r…", n_tokens,
                            self.context_length, prompt[:60])
            tokens = oc_tokenizer.tokenize([prompt], context_length=self.context_length)
            with torch.inference_mode(False), torch.no_grad(), self._autocast():
                emb = self.model.encode_text(tokens.to(self.device)).float()
            self._text_cache[prompt] = F.normalize(emb, dim=-1)
        return self._text_cache[prompt]


def d_clip(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Spherical distance of unit embeddings, 2·arcsin(‖u−v‖/2)² (the official code's D_CLIP)."""
    return (image_emb - text_emb).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def _sequence_first(model: torch.nn.Module) -> None:
    """Run the transformers sequence-first (L, N, D), as OpenAI's CLIP does; open_clip supports it.
    Same math; batch-first attention hands strided views to F.linear, which on CPU made the CLIP part
    of a guided step 1.3x slower in fp32 (tests/benchmark.py --clip-seq-first measured it)."""
    for tr in (getattr(model.visual, "transformer", None), getattr(model, "transformer", None)):
        if tr is not None and getattr(tr, "batch_first", False):
            tr.batch_first = False
            for block in tr.resblocks:
                block.attn.batch_first = False


def load_clip(path: str, device="cpu", precision: str = "fp32") -> ClipModel:
    """Load an OpenAI-format CLIP (TorchScript archive, .pt/.bin state dict or .safetensors)."""
    sd = read_state_dict(path, "an OpenAI CLIP checkpoint such as ViT-B-16.pt")
    if not ("visual.conv1.weight" in sd or "visual.layer1.0.conv1.weight" in sd) or \
            "token_embedding.weight" not in sd:
        raise CheckpointError(f"{path}: this is {describe(sd)}, not an OpenAI-format CLIP "
                              "(expected e.g. ViT-B-16.pt with image and text towers)")
    sd = {k: v for k, v in sd.items()  # metadata and derived buffers some archives carry
          if k not in ("input_resolution", "context_length", "vocab_size") and not k.endswith("attn_mask")}
    try:
        with torch.inference_mode(False):
            # open_clip builds in fp16 before loading; reload so fp32 weights keep their precision
            model = build_model_from_openai_state_dict(dict(sd), cast_dtype=None).float()
            model.load_state_dict(sd)
            _sequence_first(model)
            model.to(device)
    except Exception as e:
        if out_of_memory(e):
            raise  # not an unknown architecture: the machine has too little memory for it
        detail = (f"missing tensor {e.args[0]!r}" if isinstance(e, KeyError) else
                  " ".join(line.strip() for line in str(e).splitlines()[:2])[:200])
        raise CheckpointError(f"{path}: unknown CLIP architecture ({detail}); expected an OpenAI-format "
                              "CLIP such as ViT-B-16.pt") from None
    log.info("loaded CLIP %s: input %s px, embed dim %d", path, model.visual.image_size,
             model.text_projection.shape[1])
    return ClipModel(model, path, precision)
