"""Safe reading of checkpoint files: safetensors, or torch.load(weights_only=True)."""
from __future__ import annotations

import logging
import os
import zipfile

import torch

from .memory import out_of_memory

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def read_state_dict(path: str, expected: str) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` dict without executing code from the file.

    ``expected`` names what the caller wants (used in error messages).
    TorchScript archives (OpenAI CLIP ``.pt``) are read with ``torch.jit.load``: that
    deserialises TorchScript, never Python pickles, and only the weights are kept.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; expected {expected}.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download?); "
                              f"download {expected} again.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        elif _is_torchscript(path):
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt, truncated, or a pickle that carries code
        if out_of_memory(e):
            raise  # not a bad file: the machine has too little memory for it
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "the file holds pickled Python objects, not plain weights; refused by safe loading"
        raise CheckpointError(f"{path}: cannot be read as {expected} ({msg}). "
                              "The file may be truncated or corrupt: download it again.") from None
    for key in ("state_dict", "model", "module"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; expected {expected}.")
    return sd


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n.split("/")[-2:-1] == ["code"] for n in z.namelist())


def describe(sd: dict[str, torch.Tensor]) -> str:
    """Say what a state dict looks like, for errors about the wrong kind of file."""
    keys = list(sd)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("model.diffusion_model.") or has("first_stage_model."):
        return "a Stable Diffusion checkpoint (use ComfyUI's Load Checkpoint for it)"
    if has("visual.") and has("token_embedding."):
        return "a CLIP model (it belongs in models/clip_guidance, for LoadCLIP)"
    if has("input_blocks.") and has("time_embed."):
        return "a guided-diffusion UNet (it belongs in models/ddpm, for LoadDDPM)"
    if has("text_model.") or has("vision_model."):
        return "a Hugging Face transformers CLIP (not supported: use the OpenAI-format file, e.g. ViT-B-16.pt)"
    if has("encoder.") and has("decoder."):
        return "an autoencoder/VAE"
    return f"an unknown model ({len(keys)} tensors, first key {keys[0]!r})"
