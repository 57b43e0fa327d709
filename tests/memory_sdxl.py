"""Computed GPU memory of NULL-text inversion and editing with SDXL base at 1024² (latent 128²), issue 14.

Nothing is allocated: ComfyUI's own SDXL UNet (``comfy.supported_models.SDXL`` with the unet config ComfyUI
detects from an SDXL base checkpoint, ``model_base.SDXL``) and its VAE are built on PyTorch's meta device in the
precision ComfyUI uses on a GPU (UNet fp16; the SDXL VAE in bf16, which has fp16's size), and the pack's calls run
on meta tensors, which have shapes and dtypes but no data. ``LiveBytes`` (a TorchDispatchMode) sees every tensor an
operator returns, counts the bytes of each new storage once and drops them when the storage is freed (a weakref
finalizer on the storage: tensors autograd saves for backward keep theirs alive, so they stay counted until the
backward releases them); its peak is the most bytes live at once. ``SavedBytes`` counts the storages autograd
saves for backward (``torch.autograd.graph.saved_tensors_hooks``).

Attention: as ComfyUI's on a GPU (PyTorch SDPA / xformers: memory-efficient, no attention matrix), counted as
PyTorch's memory-efficient kernel (``aten._scaled_dot_product_efficient_attention``: the output and, with autograd,
a float32 log-sum-exp per query row); its small workspace, like every kernel's own scratch space (cuDNN, cuBLAS),
is not counted, nor are the CUDA context (several hundred MiB) and the caching allocator's rounding and
fragmentation. Prompt-to-prompt's patch (models/p2p.py) computes explicit float32 probabilities in the layers it
edits (cross-attention, and self-attention in layers of at most 1/16 of the latent's pixels), which is counted as
it runs.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/memory_sdxl.py [--size 1024] [--json out.json]

Importable without ComfyUI: ``LiveBytes``, ``SavedBytes``, ``storage_bytes``, ``module_bytes``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GIB = 2 ** 30
CONTEXT_TOKENS = 77


# ---------------------------------------------------------------- the counters (no ComfyUI)
def _key(t: torch.Tensor) -> int:
    """The identity of a tensor's storage while it lives (the StorageImpl's address)."""
    return t.untyped_storage()._cdata


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (each storage once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen.setdefault(_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared storages once)."""
    return storage_bytes(list(module.parameters()) + list(module.buffers()))


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by operators inside the mode that are still alive: ``current``, and the most
    at once, ``peak``. Storages that existed before (weights, inputs made outside) are not counted. Each storage is
    counted once, however many views of it there are, and released when PyTorch frees it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.created = 0  # bytes of all storages created
        self.origin: dict[int, str] = {}  # the operator that created each live storage

    def _free(self, key: int, nbytes: int):
        if self.live.get(key) == nbytes:
            del self.live[key]
            self.origin.pop(key, None)
            self.current -= nbytes

    def track(self, t: torch.Tensor, op: str = ""):
        key = _key(t)
        if key in self.live:
            return
        st = t.untyped_storage()
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.created += n
        self.origin[key] = op
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key, n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: not a new one (weights' views stay uncounted)
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:
                self.track(t, func.__name__.split(".")[0])
        return out

    def reset_peak(self):
        self.peak = self.current


class SavedBytes(contextlib.AbstractContextManager):
    """Bytes of the distinct storages autograd saves for backward inside the block (``saved``; those of
    ``exclude``, e.g. the weights, are left out and reported as ``saved_excluded``)."""

    def __init__(self, exclude=(), live: LiveBytes | None = None):
        self.exclude = {_key(t) for t in exclude}
        self.live = live  # with it, ``by_op`` says which operators made the saved storages
        self.by_op: dict[str, int] = {}
        self.keys: dict[int, int] = {}
        self.excluded: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        key = _key(t)
        target = self.excluded if key in self.exclude else self.keys
        if key not in target:
            target[key] = t.untyped_storage().nbytes()
            if self.live is not None and target is self.keys:
                op = self.live.origin.get(key, "(made before)")
                self.by_op[op] = self.by_op.get(op, 0) + target[key]
        return t

    @property
    def saved(self) -> int:
        return sum(self.keys.values())

    @property
    def saved_excluded(self) -> int:
        return sum(self.excluded.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """``F.scaled_dot_product_attention`` as PyTorch's memory-efficient kernel (what a GPU runs; here on meta
    tensors): the output [B, H, N, D] and, with autograd, a float32 log-sum-exp [B, H, N]; no N×N matrix."""
    if attn_mask is not None or dropout_p or kw:
        raise ValueError("the counted attention has no mask and no dropout")
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), 0.0, is_causal,
        scale=scale)[0]


def cpu_flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """``F.scaled_dot_product_attention`` as PyTorch's CPU flash kernel, which runs on real CPU tensors and on meta
    ones alike (the tests compare the two counts with it)."""
    if attn_mask is not None or dropout_p or kw:
        raise ValueError("the counted attention has no mask and no dropout")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention(kernel=efficient_sdpa):
    """Inside: ComfyUI's UNet and VAE attention take PyTorch's SDPA (ComfyUI's choice on a GPU), counted as the
    memory-efficient kernel (``kernel``, default ``efficient_sdpa``); prompt-to-prompt's fused path too.
    Restored after."""
    import comfy.ldm.modules.attention as attn
    saved = attn.optimized_attention, attn.optimized_attention_masked, F.scaled_dot_product_attention
    attn.optimized_attention = attn.optimized_attention_masked = attn.attention_pytorch
    F.scaled_dot_product_attention = kernel
    try:
        yield
    finally:
        attn.optimized_attention, attn.optimized_attention_masked, F.scaled_dot_product_attention = saved


# ---------------------------------------------------------------- SDXL on meta (ComfyUI)
def import_comfy():
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not (Path(path) / "comfy" / "model_base.py").is_file():
        raise SystemExit("memory_sdxl.py builds ComfyUI's SDXL: set COMFYUI_PATH to a ComfyUI checkout and run it "
                         "with that ComfyUI's Python")
    if path not in sys.path:
        sys.path.append(str(Path(path).resolve()))
    from comfy.cli_args import args as comfy_args
    if not torch.cuda.is_available():
        comfy_args.cpu = True
    for name in ("comfy.model_management", "comfy.model_base", "comfy.supported_models"):
        importlib.import_module(name)  # ComfyUI's requirements: fail here, not in the middle
    from pack import load_pack
    load_pack()


def sdxl_unet_meta(dtype=torch.float16, unet_config: dict | None = None, device="meta"):
    """ComfyUI's SDXL (``model_base.SDXL``) on ``device`` (meta: no memory) in ``dtype``; default: SDXL base's
    unet config (tests/benchmark_nulltext.py's SDXL_UNET, as ComfyUI detects it). Real devices get seeded
    weights (ComfyUI's layers skip init)."""
    import comfy.supported_models
    from benchmark_nulltext import SDXL_UNET
    cfg = comfy.supported_models.SDXL(dict(unet_config or SDXL_UNET))
    if unet_config is not None and "num_head_channels" in unet_config:
        cfg.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    cfg.set_inference_dtype(dtype, None)
    with torch.device(device):
        base = cfg.get_model({}, device=torch.device(device))
    if torch.device(device).type != "meta":
        import tiny_sd
        with torch.no_grad():
            tiny_sd._randomize(base.diffusion_model, torch.Generator().manual_seed(0))
    return base


def sdxl_vae_meta(dtype=torch.bfloat16):
    """The SDXL VAE (SD's AutoencoderKL architecture: ch 128, mult 1,2,4,4) on meta, with SDPA attention."""
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from benchmark_nulltext import SD_VAE
    with torch.device("meta"):
        ae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4).to(dtype)
    for m in ae.modules():
        if isinstance(m, vae_model.AttnBlock):
            m.optimized_attention = vae_model.pytorch_attention
    return ae


def _inputs(base, batch: int, latent: int):
    """What SDModel._eps hands ``apply_model`` (on the model's device): x_in and σ in float32, the context
    [B, 77, context_dim] and y [B, adm_in_channels] in float32."""
    dev = next(base.diffusion_model.parameters()).device
    ctx_dim = base.model_config.unet_config["context_dim"]
    x = torch.zeros(batch, 4, latent, latent, device=dev)
    sigma = torch.ones(batch, device=dev)
    ctx = torch.zeros(batch, CONTEXT_TOKENS, ctx_dim, device=dev)
    y = torch.zeros(batch, base.adm_channels, device=dev) if base.adm_channels else None  # SD1.x/SD2.x: none
    return x, sigma, ctx, y


def _extra(y) -> dict:
    return {} if y is None else {"y": y}


def count_unet_call(base, batch: int, latent: int, options: dict | None = None, kernel=efficient_sdpa) -> dict:
    """One inference UNet call (no autograd), as SDModel._eps makes it: peak live bytes of activations and
    inputs."""
    with gpu_attention(kernel), torch.no_grad(), LiveBytes() as lb:
        x, sigma, ctx, y = _inputs(base, batch, latent)
        out = base.apply_model(x, sigma, c_crossattn=ctx, transformer_options=dict(options or {}), **_extra(y))
        assert out.shape == x.shape
        del out, x, sigma, ctx, y
    return dict(peak=lb.peak, left=lb.current)


def count_nulltext_step(base, latent: int, kernel=efficient_sdpa) -> dict:
    """One NULL-text Adam step as models/nulltext.py's null_text_optimize takes it: the null context (float32,
    requires grad) through the UNet (weights frozen), the guided DDIM step, the MSE loss, backward to the context,
    Adam's update. Peak live bytes over forward and backward, and the bytes saved for backward."""
    from blended_diffusion.models.nulltext import ddim_step
    weights = list(base.parameters()) + list(base.buffers())
    with gpu_attention(kernel), LiveBytes() as lb:
        x, sigma, ctx, y = _inputs(base, 1, latent)
        with torch.no_grad():
            e_c = torch.empty_like(x)
            target = torch.empty_like(x)
        null = torch.zeros_like(ctx).requires_grad_(True)
        opt = torch.optim.Adam([null], lr=1e-2)
        with SavedBytes(exclude=weights, live=lb) as sb:
            denoised = base.apply_model(x, sigma, c_crossattn=null, transformer_options={}, **_extra(y))
            e_u = (x - denoised.float()) / sigma.view(-1, 1, 1, 1)
            pred = ddim_step(x, e_u + 7.5 * (e_c - e_u), 0.5, 0.6)
            loss = F.mse_loss(pred.float(), target.float())
        after_forward, forward_peak = lb.current, lb.peak
        lb.reset_peak()
        (grad,) = torch.autograd.grad(loss, [null])
        null.grad = grad
        opt.step()
        del denoised, e_u, pred, loss, grad
    return dict(peak=max(forward_peak, lb.peak), forward_peak=forward_peak, backward_peak=lb.peak,
                after_forward=after_forward, saved=sb.saved,
                saved_weights=sb.saved_excluded, saved_by_op=dict(sorted(sb.by_op.items(), key=lambda kv: -kv[1])),
                left=lb.current)


def p2p_controller(latent: int, step: int = 0, steps: int = 50):
    """NullTextEdit's controller for "a photo of a cat" → "a photo of a dog" (replace, cross 0.8, self 0.4, local
    blend on cat/dog, self-attention and blend layers of at most 1/16 of the latent's pixels), at ``step``: at
    step 0 every window is on (the most the patch computes)."""
    from blended_diffusion.models import p2p
    src, dst = p2p.tokenize("a photo of a cat"), p2p.tokenize("a photo of a dog")
    ctrl = p2p.prompt_to_prompt(src, [dst], "replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                                self_max_tokens=latent * latent // 16, blend_words=(["cat"], ["dog"]))
    ctrl.local_blend.max_tokens = latent * latent // 16
    ctrl.reset()
    ctrl.begin_step(step, steps, cond_or_uncond=[1, 0], latent_shape=(latent, latent))
    return ctrl


def p2p_options(ctrl) -> dict:
    """transformer_options with the prompt-to-prompt patch on every transformer block, as SDModel(model, ctrl)
    sets them (ModelPatcher.set_model_attn1_replace / attn2_replace build the same model_options)."""
    from comfy.model_patcher import set_model_options_patch_replace
    from blended_diffusion.models import p2p
    opts = {"transformer_options": {}}
    for name, number in p2p.comfy_block_keys():
        opts = set_model_options_patch_replace(opts, p2p.attention_patch(ctrl, False), "attn1", name, number)
        opts = set_model_options_patch_replace(opts, p2p.attention_patch(ctrl, True), "attn2", name, number)
    return opts["transformer_options"]


def count_p2p_step(base, latent: int, kernel=efficient_sdpa) -> dict:
    """One prompt-to-prompt UNet call (source + edit, with CFG: batch 4) under the attention patch at step 0, and
    what models/p2p.py keeps between calls (local blending's accumulated cross-attention maps)."""
    ctrl = p2p_controller(latent)
    call = count_unet_call(base, 4, latent, p2p_options(ctrl), kernel)
    kept = [t for v in ctrl.local_blend._step.values() for t in v if isinstance(t, torch.Tensor)]
    layers = len(ctrl.local_blend._step)
    return dict(call, kept=storage_bytes(kept), blend_layers=layers)


def count_vae(ae, size: int) -> dict:
    """VAE encode of one [1, 3, size, size] image and decode of its latent (whole, untiled), no autograd."""
    dt = next(ae.parameters()).dtype
    with gpu_attention(), torch.no_grad():
        with LiveBytes() as enc:
            z = ae.encode(torch.empty(1, 3, size, size, device="meta", dtype=dt))
            z = z.sample() if hasattr(z, "sample") else z
        with LiveBytes() as dec:
            img = ae.decode(torch.empty(1, 4, size // 8, size // 8, device="meta", dtype=dt))
            assert img.shape[-1] == size
            del img
    return dict(encode_peak=enc.peak, decode_peak=dec.peak)


def comfy_estimate(base, shape) -> float:
    """ComfyUI's ``memory_required`` for a UNet call, as on a GPU with memory-efficient attention (its branch for
    xformers / PyTorch's flash attention; on the CPU it takes the larger estimate of the split kernels)."""
    import comfy.model_management as mm
    saved = mm.pytorch_attention_flash_attention
    mm.pytorch_attention_flash_attention = lambda: True
    try:
        return float(base.memory_required(list(shape)))
    finally:
        mm.pytorch_attention_flash_attention = saved


def compute(size: int = 1024) -> dict:
    """Every figure of the table, in bytes."""
    latent = size // 8
    base = sdxl_unet_meta(torch.float16)
    w = module_bytes(base.diffusion_model)
    n_params = sum(p.numel() for p in base.diffusion_model.parameters())
    res = dict(size=size, latent=latent, unet_params=n_params, unet_weights=w, calls={})
    for b in (1, 2, 4):
        c = count_unet_call(base, b, latent)
        est = comfy_estimate(base, [b, 4, latent, latent])  # ComfyUI's own estimate
        res["calls"][b] = dict(c, comfy_estimate=est)
    res["p2p"] = count_p2p_step(base, latent)
    res["nulltext"] = count_nulltext_step(base, latent)
    ae = sdxl_vae_meta(torch.bfloat16)
    res["vae_weights"] = module_bytes(ae)
    res["vae_params"] = sum(p.numel() for p in ae.parameters())
    res["vae"] = count_vae(ae, size)
    res["grad_bytes_per_pixel"] = {"SDXL": res["nulltext"]["peak"] / latent ** 2,
                                   "SD15": grad_bytes_per_pixel(sd15_unet_meta(), 64)}
    return res


def sd15_unet_meta(dtype=torch.float16):
    """ComfyUI's SD1.5 UNet (``comfy.supported_models.SD15``, tests/benchmark_nulltext.py's SD15_UNET) on meta."""
    import comfy.supported_models
    from benchmark_nulltext import SD15_UNET
    cfg = comfy.supported_models.SD15(dict(SD15_UNET))
    cfg.set_inference_dtype(dtype, None)
    with torch.device("meta"):
        return cfg.get_model({}, device=torch.device("meta"))


def grad_bytes_per_pixel(base, latent: int) -> float:
    """Bytes NULL-text's Adam step keeps at its peak per latent pixel (host/sd.py's GRAD_BYTES_PER_PIXEL)."""
    return count_nulltext_step(base, latent)["peak"] / latent ** 2


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_table(r: dict) -> str:
    w = r["unet_weights"]
    s = r["size"]
    lines = [f"SDXL base at {s}x{s} (latent {r['latent']}x{r['latent']}), computed on meta tensors (no allocation); "
             f"GiB = 2^30 bytes",
             f"UNet {r['unet_params'] / 1e9:.3f} G parameters, fp16 weights {gib(w)} GiB; VAE "
             f"{r['vae_params'] / 1e6:.1f} M parameters, bf16 weights {gib(r['vae_weights'])} GiB",
             "attention: memory-efficient SDPA (no attention matrix); prompt-to-prompt's edited layers: explicit "
             "float32 probabilities, as models/p2p.py computes them", "",
             "| step | UNet batch | activations peak GiB | with the UNet weights GiB | ComfyUI's memory_required "
             "estimate GiB |", "|---|---|---|---|---|"]
    names = {1: "DDIM inversion (guidance 1), NPI's reconstruction", 2: "CFG: reconstruction, SDEdit, Direct "
             "Inversion", 4: "prompt-to-prompt, source + edit with CFG (no patch)"}
    for b, c in sorted(r["calls"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {names[int(b)]} | {b} | {gib(c['peak'])} | {gib(w + c['peak'])} | "
                     f"{gib(c['comfy_estimate'])} |")
    p = r["p2p"]
    lines.append(f"| prompt-to-prompt with its attention patch (step 0: every window on; local blend keeps "
                 f"{p['kept'] / 2**20:.2f} MiB over {p['blend_layers']} layers between calls) | 4 | {gib(p['peak'])} | "
                 f"{gib(w + p['peak'])} | — |")
    n = r["nulltext"]
    lines.append(f"| NULL-text Adam step (fwd with grad w.r.t. the context + bwd; saved for backward "
                 f"{gib(n['saved'])} GiB, peak in the backward {gib(n['backward_peak'])}) | 1 | {gib(n['peak'])} | "
                 f"{gib(w + n['peak'])} | — |")
    v = r["vae"]
    lines.append(f"| VAE encode {s}² (whole image) | 1 | {gib(v['encode_peak'])} | {gib(r['vae_weights'] + v['encode_peak'])}"
                 f" (VAE weights) | — |")
    lines.append(f"| VAE decode {s}² (whole image; ComfyUI decodes in tiles when memory is short) | 1 | "
                 f"{gib(v['decode_peak'])} | {gib(r['vae_weights'] + v['decode_peak'])} (VAE weights) | — |")
    worst = max(w + n["peak"], w + p["peak"], *(w + c["peak"] for c in r["calls"].values()))
    lines += ["", f"largest: {gib(worst)} GiB (UNet weights + the step's activations; the text encoders, "
                  "1.5 GiB in fp16, and the VAE are offloaded by ComfyUI while the UNet runs when room is short)",
              "saved for backward, by the operator that made the storage: " + ", ".join(
                  f"{op} {gib(b)}" for op, b in list(n["saved_by_op"].items())[:8]) + " GiB",
              "NULL-text's Adam step per latent pixel (host/sd.py's GRAD_BYTES_PER_PIXEL): " + ", ".join(
                  f"{k} {v:,.0f} bytes" for k, v in r["grad_bytes_per_pixel"].items()) + " (SD1.5 at 512²)",
              "SDModel.rows_per_call splits a batch when ComfyUI's estimate x 1.5 reaches the free memory: batch 4 "
              f"needs {gib(1.5 * r['calls'][4]['comfy_estimate'])} GiB free by that rule"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 64)")
    p.add_argument("--json", default=None, help="also write the figures (bytes) to this JSON file")
    a = p.parse_args(argv)
    if a.size % 64:
        p.error(f"--size {a.size}: give a multiple of 64 (SDXL's UNet halves the latent three times)")
    import_comfy()
    res = compute(a.size)
    print(format_table(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
