"""Checks shared by the tiny single-file checkpoint tests (tests/test_tiny_sdxl.py, tests/test_tiny_sd2v.py):
load a file as core CheckpointLoaderSimple does, with ComfyUI's load log, and compare what ComfyUI loaded with
what the file holds. ComfyUI must already be importable."""
from __future__ import annotations

import ast
import json
import logging
import time

import torch

W, H = 96, 64  # 12x8 latents
PROMPT = "a red ball next to a small house"
TARGET = "a red cube next to a small house"
# loader messages that mean a tensor was not found or not used (comfy/sd.py, comfy/model_base.py)
BAD = ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE", "clip unexpected", "left over keys")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def load_logged(path):
    """(model, clip, vae, log records, seconds) as CheckpointLoaderSimple gets them (in inference mode)."""
    import comfy.sd
    handler, root = Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        t = time.perf_counter()
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        seconds = time.perf_counter() - t
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return model, clip, vae, handler.records, seconds


def clip_missing(records) -> set[str]:
    """The keys ComfyUI's log says the text encoders did not find (its "clip missing: [...]" line)."""
    out = set()
    for r in records:
        msg = r.getMessage()
        if msg.startswith("clip missing: "):
            out |= set(ast.literal_eval(msg[len("clip missing: "):]))
    return out


def check_every_weight_loaded(tensors: dict, loaded, clip_prefixes: tuple[str, ...], allowed_missing: set[str]):
    """Every tensor of the file is in the loaded UNet, VAE and text encoders, equal, and they have nothing else
    (except ``allowed_missing``, which real files of the family lack too); the loader logged no problem."""
    import tiny_sd
    model, clip, vae, records = loaded[:4]
    text = [r.getMessage() for r in records]
    bad = [t for t in text if t.startswith(BAD)]
    assert not bad, bad
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    assert clip_missing(records) == allowed_missing, clip_missing(records)
    base = model.model
    parts = {tiny_sd.UNET_PREFIX: base.diffusion_model.state_dict(),
             tiny_sd.VAE_PREFIX: vae.first_stage_model.state_dict()}
    for prefix, loaded_sd in parts.items():
        written = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        assert set(loaded_sd) == set(written), (prefix, sorted(set(loaded_sd) ^ set(written))[:10])
        for k, v in written.items():
            assert torch.equal(loaded_sd[k].float().cpu(), v.float()), prefix + k
    # the text encoders, mapped back to the file's layout by ComfyUI's own saving code (CheckpointSave's)
    clip_sd = {k: v for k, v in clip.cond_stage_model.state_dict().items() if k not in allowed_missing}
    back = base.model_config.process_clip_state_dict_for_saving(clip_sd)
    back = {k: v for k, v in back.items() if not k.endswith("position_ids")}
    written = {k: v for k, v in tensors.items() if k.startswith(clip_prefixes)}
    assert set(back) == set(written), sorted(set(back) ^ set(written))[:10]
    for k, v in written.items():
        assert torch.equal(back[k].float().cpu(), v.float()), k
    # nothing else in the file
    assert set(tensors) == set(written) | {p + k for p, sd in parts.items() for k in sd}


def image():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    img = torch.stack([xx, yy, 1 - (xx + yy) / 2], -1)[None] * 0.8 + 0.1
    img[:, 16:48, 30:60] = torch.tensor([0.9, 0.2, 0.2])
    return img


def outputs(loaded, img):
    """(sd, z, cond, other prompt's cond, eps, eps for the other prompt, decoded image) through host/sd.py."""
    from blended_diffusion.host import sd as host_sd
    model, clip, vae = loaded[:3]
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        z, _ = sd.encode(vae, img)
        cond, other = sd.condition(clip, PROMPT, z), sd.condition(clip, "a blue cube under a tall tree", z)
        t = torch.tensor([500])
        eps = sd.eps(z.to(sd.device), t, cond.to(sd.device))
        eps_other = sd.eps(z.to(sd.device), t, other.to(sd.device))
        x = sd.decode(vae, z)
    return sd, z, cond, other, eps, eps_other, x


def run(node_type, **kw):
    from blended_diffusion.nodes import NODE_CLASS_MAPPINGS
    cls = NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**kw)
    return out["result"] if isinstance(out, dict) else out


def invert_and_edit(loaded, img, method="direct", steps=2):
    """NullTextInvert (``method``; 2 Adam steps per step for the NULL-text ones), then NullTextEdit (replace) and
    NullTextSDEdit (from the inversion at t0 1: the caption, and the target) on the file's model:
    (inversion, reconstruction, report, edit, SDEdit with the caption, SDEdit with the target)."""
    model, clip, vae = loaded[:3]
    inv, recon, report = run("NullTextInvert", model=model, clip=clip, vae=vae, image=img, prompt=PROMPT, steps=steps,
                             guidance=7.5, inner_steps=2, global_null=False, method=method)
    kw = dict(model=model, clip=clip, vae=vae, inversion=inv, guidance=7.5)
    (out,) = run("NullTextEdit", target_prompt=TARGET, mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                 reweight_words="", reweight_factor=1.0, blend_words="", **kw)
    (same,) = run("NullTextSDEdit", target_prompt="", t0=1.0, start="inversion", seed=0, **kw)
    (sde,) = run("NullTextSDEdit", target_prompt=TARGET, t0=1.0, start="inversion", seed=0, **kw)
    return inv, recon, json.loads(report), out, same, sde


def check_inversion_and_edits(loaded, method: str, family: str, cond_kind: str) -> None:
    """``invert_and_edit`` with ``method`` on a loaded checkpoint: the inversion records family, conditioning and
    method; Direct Inversion reconstructs exactly; prompt-to-prompt's source row is the reconstruction and its edit
    row differs; SDEdit from the inversion with the caption is the reconstruction, with the target it differs."""
    inv, recon, report, out, same, sde = invert_and_edit(loaded, image(), method=method)
    assert (inv.family, inv.cond_kind, inv.method) == (family, cond_kind, method)
    assert recon.shape == (1, H, W, 3) and torch.isfinite(recon).all()
    if method == "direct":
        assert report["latent_mse"] < 1e-10, report["latent_mse"]  # exact
    assert 0 <= report["latent_mse"] < float("inf")
    assert out.shape == (2, H, W, 3)
    assert (out[0] - recon[0]).abs().max() < 1e-3 and (out[1] - out[0]).abs().max() > 1e-3
    assert (same - recon).abs().max() < 1e-4, "SDEdit from the inversion with the caption is the reconstruction"
    assert (sde - recon).abs().max() > 1e-3, float((sde - recon).abs().max())
