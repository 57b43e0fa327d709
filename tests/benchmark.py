"""Benchmark of the guided step (issue 5). Not part of the pass/fail suite; tests/test_benchmark_smoke.py
runs it with the tiny configuration.

    python tests/benchmark.py --config real --steps 2 --batch 1 --views 8 --device cpu --threads 1 --clock cpu
    python tests/benchmark.py --config small,tiny --steps 3 --channels-last
    python tests/benchmark.py --config real --device cuda --precision bf16 --batch 8 --compile

Configurations (random weights; written to disk in the real formats and read back through
``models.load_ddpm`` / ``models.load_clip``, so the real loader path builds the networks):
- real:  guided-diffusion 256x256 uncond UNet (num_channels 256, num_head_channels 64, num_res_blocks 2,
         attention 32,16,8, learn_sigma, scale-shift norm, resblock_updown; 553 M parameters) and OpenAI
         ViT-B/16 CLIP (embed 512; vision width 768, 12 layers, patch 16, 224 px; text width 512,
         12 layers, 8 heads, context 77, vocab 49408, quick_gelu).
- small: the same UNet layout at 256 px with 64 channels and 1 res block per level; a ViT with
         width 384, 6 layers, patch 32 (a quick run).
- tiny:  a 64x64 UNet with 32 channels and the 1-layer CLIP of tests/tiny.py, for the smoke test.

What is timed, per configuration, in one run and interleaved (every diffusion step of the engine loop is
followed by one round of the other measurements, so that load from other processes hits all of them
alike; the first ``--warmup`` rounds are discarded and the median of the rest is reported):
- ours:       the engine itself: ``models.blended.blended_diffusion`` (Algorithm 2) with a callback
              that takes the time of each step (the callback's own work is excluded).
- bare:       one UNet forward with grad w.r.t. x_t (``ddpm.eps_and_var`` + ``pred_xstart``) and one
              backward (``torch.autograd.grad(x0, x_t, g)``) at the same batch: the cost of the model.
- reference:  the official code's step: a UNet forward without grad (posterior) + ``guided_eps``
              (a forward with grad, CLIP, backward) + ``ddpm_step`` + blend.
- fast:       the engine's loop body (``guided_eps`` + ``pred_xstart`` + ``ddpm_step`` + blend) with
              ``Guide(fast=True)`` (no UNet backward).
- The split of a guided step mirrors ``guided_eps``: "UNet fwd" and "UNet bwd" are the two halves of the
  bare measurement (it is exactly the forward with grad and the backward that ``guided_eps`` runs);
  "CLIP+aug" is ``random_homographies`` + ``guidance_loss`` + ``autograd.grad`` w.r.t. (x̂0, x_t) on a
  detached x̂0 (CLIP forward and backward, the augmentations, the range loss); "blend" is
  ``pred_xstart`` + ``ddpm_step`` + ``q_sample`` of the background + the blend line, noise included.
  "other" is what the measured step has beyond the sum of its pieces (noise can make it negative).
- Levers, timed in the same rounds: the text encoder on an uncached prompt (what the per-prompt cache
  saves each step); the CLIP+aug piece with CLIP called on ``--view-chunks`` views at a time instead of
  all views in one call; the CLIP+aug piece with CLIP in bf16 autocast (same weights); model loading
  (what keeping models loaded saves). Their "ours would be" ratios substitute the piece into the
  measured step (an estimate). ``--channels-last``, ``--compile``, ``--precision``,
  ``--clip-precision``, ``--keep-freed-memory`` are whole-run switches: compare the ratios of two runs.
- ``--clip-views-per-call N`` patches a proposed engine change onto the loaded CLIP of this process only.
  ``--clip-seq-first`` was the other one; models/clip.py now does it (the flag changes nothing), and the
  lever row "batch-first transformers" times the CLIP+aug piece the way the loader ran it before.

On a CPU machine shared with other work, use ``--threads 1 --clock cpu``: process CPU time of one
thread does not count the time other processes take, and 2 OpenMP threads on oversubscribed cores
spend much of their time waiting for each other.

Peak memory: on CUDA the max allocated per mode; on CPU the process's peak RSS (ru_maxrss), one number
for the whole configuration (CPU has no per-phase peak counter).
On CUDA the device is synchronised only around the timed regions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack import load_pack  # noqa: E402
RESULT_STEPS = 75  # the paper's setting: respacing 100, skip_timesteps 25

UNET_BASE = dict(image_size=256, in_channels=3, out_channels=6, channel_mult=(1, 1, 2, 2, 4, 4),
                 num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, dropout=0.0)
CONFIGS = {
    "real": dict(unet=dict(UNET_BASE, model_channels=256, num_res_blocks=2, attention_resolutions=(8, 16, 32)),
                 clip=dict(embed_dim=512, vision=dict(layers=12, width=768, patch_size=16, image_size=224),
                           text=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)),
                 desc="UNet 256x256 uncond (256 ch, 2 res blocks, attn 32,16,8), CLIP ViT-B/16"),
    "small": dict(unet=dict(UNET_BASE, model_channels=64, num_res_blocks=1, attention_resolutions=(8, 16, 32)),
                  clip=dict(embed_dim=256, vision=dict(layers=6, width=384, patch_size=32, image_size=224),
                            text=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=4)),
                  desc="UNet 256x256 (64 ch, 1 res block, attn 32,16,8), ViT w384 l6 p32"),
    "tiny": dict(unet=dict(UNET_BASE, image_size=64, channel_mult=(1, 2, 3, 4), model_channels=32,
                           num_res_blocks=1, attention_resolutions=(8,), use_new_attention_order=True),
                 clip=dict(embed_dim=32, vision=dict(layers=1, width=64, patch_size=32, image_size=224),
                           text=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)),
                 desc="UNet 64x64 (32 ch, 1 res block, attn 8), ViT w64 l1 p32 (tests/tiny.py CLIP)"),
}
MODES = ("bare", "ours", "reference", "fast")
COLUMNS = ("s_step", "unet_fwd", "unet_bwd", "clip_aug", "blend", "other", "s_result", "peak_mib",
           "x_bare", "x_reference")


# ---------------------------------------------------------------- checkpoints with random weights
def write_checkpoints(name: str, ckpt_dir: Path) -> tuple[Path, Path]:
    """Random-weight UNet (guided-diffusion state dict) and CLIP (OpenAI-format state dict) files."""
    from guided_diffusion.unet import UNetModel
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    cfg = CONFIGS[name]
    unet_path, clip_path = ckpt_dir / f"bench_{name}_unet.pt", ckpt_dir / f"bench_{name}_clip.pt"
    if not unet_path.exists():
        torch.manual_seed(0)
        m = UNetModel(**cfg["unet"])
        with torch.no_grad():  # guided-diffusion zero-inits its output convs: give them weights
            for p in m.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(0, 0.02)
        torch.save(m.state_dict(), unet_path)
        del m
    if not clip_path.exists():
        torch.manual_seed(0)
        c = cfg["clip"]
        m = CLIP(c["embed_dim"], CLIPVisionCfg(**c["vision"]), CLIPTextCfg(**c["text"]), quick_gelu=True)
        torch.save({k: v.contiguous() for k, v in m.state_dict().items()}, clip_path)
        del m
    return unet_path, clip_path


# ---------------------------------------------------------------- timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def now(device):
    sync(device)
    return _clock()


def cuda_peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def cpu_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def keep_freed_memory(enabled: bool):
    """CPU lever (models/memory.py, what the CLI does on the CPU): glibc keeps freed memory in the
    process instead of handing each large UNet activation back to the kernel and faulting it in again
    every step. Given back to the kernel again after."""
    load_pack()
    from blended_diffusion.models import memory
    if enabled and not memory.keep_freed_memory(True):
        raise SystemExit("--keep-freed-memory needs glibc's mallopt")
    try:
        yield
    finally:
        if enabled:
            memory.keep_freed_memory(False)


# ---------------------------------------------------------------- the measured pieces
class Bench:
    def __init__(self, ddpm, clip, guide, fast_guide, source, mask, gens, step_index, channels_last=False):
        from blended_diffusion.models import blended, guidance
        self.blended, self.guidance = blended, guidance
        self.ddpm, self.clip, self.guide, self.fast_guide = ddpm, clip, guide, fast_guide
        self.source, self.mask, self.gens = source, mask, gens
        self.dev = source.device
        self.i = step_index
        g = torch.Generator().manual_seed(1)
        self.x = ddpm.q_sample(source, self.i, torch.randn(source.shape, generator=g).to(self.dev))
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.g = torch.randn(source.shape, generator=g).to(self.dev)  # a gradient w.r.t. x̂0
        self.y = blended.class_labels(ddpm, gens, None, self.dev)
        self.times: dict[str, list[float]] = {}
        self.peaks: dict[str, float] = {}

    def record(self, key, value):
        self.times.setdefault(key, []).append(value)

    def peak(self, mode):
        self.peaks[mode] = max(self.peaks.get(mode, 0.0), cuda_peak_mib(self.dev))

    def noise(self):
        return self.blended.randn(self.gens, self.source.shape[1:], self.dev)

    def bare(self):
        """UNet forward with grad w.r.t. x_t, then backward: the cost of the model at this batch."""
        d, i = self.ddpm, self.i
        cuda_peak_reset(self.dev)
        x = self.x.detach().requires_grad_(True)
        t0 = now(self.dev)
        eps, v = d.eps_and_var(x, i, self.y)
        x0 = d.pred_xstart(x, i, eps)
        t1 = now(self.dev)
        (gx,) = torch.autograd.grad(x0, x, self.g)
        t2 = now(self.dev)
        self.peak("bare")
        self.record("unet_fwd", t1 - t0)
        self.record("unet_bwd", t2 - t1)
        self.record("bare", t2 - t0)
        self.x0 = x0.detach()
        self.eps, self.v = eps.detach(), None if v is None else v.detach()
        return gx

    def clip_aug(self, guide=None, chunk=None, key="clip_aug"):
        """random_homographies + guidance_loss + its gradient w.r.t. (x̂0, x_t), x̂0 detached.
        chunk: CLIP called on this many views at a time instead of all at once (a lever)."""
        guide = guide or self.guide
        gd = self.guidance
        n = guide.augment.num_views
        t0 = now(self.dev)
        mats = torch.stack([gd.random_homographies(g, n, guide.clip.input_size, guide.augment)
                            for g in self.gens]).to(self.dev)
        x = self.x.detach().requires_grad_(True)
        x0 = self.x0.detach().requires_grad_(True)
        fac = self.ddpm.schedule.sqrt_1m_ac[self.i]
        if chunk:
            loss = chunked_loss(guide, x0, x, fac, self.mask, mats, chunk)
        else:
            loss = gd.guidance_loss(guide, x0, x, fac, self.source, self.mask, mats)
        gx0, gx = torch.autograd.grad(loss, [x0, x])
        t1 = now(self.dev)
        self.record(key, t1 - t0)
        return gx0, gx

    def blend(self, grad):
        """pred_xstart + ddpm_step + background q_sample + the blend line (noise drawn as the loop does)."""
        d, i, b = self.ddpm, self.i, self.blended
        t0 = now(self.dev)
        x0 = d.pred_xstart(self.x, i, self.eps)  # noqa: F841  (the loop computes it for the preview)
        x_fg = b.ddpm_step(d, self.x, i, self.eps, self.v, grad, self.noise())
        x_bg = d.q_sample(self.source, i - 1, self.noise())
        x = x_fg * self.mask + x_bg * (1 - self.mask)
        t1 = now(self.dev)
        self.record("blend", t1 - t0)
        return x

    def engine_step(self, guide):
        """The body of blended_diffusion's loop, with the engine's functions."""
        d, i, b = self.ddpm, self.i, self.blended
        eps, v, grad = self.guidance.guided_eps(d, self.x, i, guide, self.source, self.mask, self.gens, self.y)
        x0 = d.pred_xstart(self.x, i, eps)  # noqa: F841
        x_fg = b.ddpm_step(d, self.x, i, eps, v, grad, self.noise())
        x_bg = d.q_sample(self.source, i - 1, self.noise())
        return x_fg * self.mask + x_bg * (1 - self.mask)

    def fast(self):
        cuda_peak_reset(self.dev)
        t0 = now(self.dev)
        self.engine_step(self.fast_guide)
        t1 = now(self.dev)
        self.peak("fast")
        self.record("fast", t1 - t0)

    def reference(self):
        """The official code's cost: forward without grad (posterior) + cond_fn (forward with grad,
        CLIP, backward) + the step and the blend."""
        d, i, b = self.ddpm, self.i, self.blended
        cuda_peak_reset(self.dev)
        t0 = now(self.dev)
        with torch.no_grad():
            eps, v = d.eps_and_var(self.x, i, self.y)
        t1 = now(self.dev)
        _, _, grad = self.guidance.guided_eps(d, self.x, i, self.guide, self.source, self.mask, self.gens, self.y)
        x_fg = b.ddpm_step(d, self.x, i, eps, v, grad, self.noise())
        x_bg = d.q_sample(self.source, i - 1, self.noise())
        x = x_fg * self.mask + x_bg * (1 - self.mask)  # noqa: F841
        t2 = now(self.dev)
        self.peak("reference")
        self.record("reference", t2 - t0)
        self.record("unet_fwd_nograd", t1 - t0)

    def text_uncached(self):
        prompt = self.guide.prompt
        self.clip._text_cache.pop(prompt, None)
        t0 = now(self.dev)
        self.clip.encode_text(prompt)
        self.record("text_encode", now(self.dev) - t0)

    def round(self, levers=True, chunks=(), lever_guides=None):
        """One of each measurement (the engine-loop step is timed by the caller)."""
        gx_unet = self.bare()
        gx0, gx = self.clip_aug()
        self.blend(-(gx + gx_unet))
        self.reference()
        self.fast()
        if levers:
            for chunk in chunks:
                self.clip_aug(chunk=chunk, key=f"clip_aug_chunk{chunk}")
            for key, guide in (lever_guides or {}).items():
                self.clip_aug(guide, key=key)
            self.text_uncached()


def sequence_first(model) -> int:
    """Switch batch-first transformers to sequence-first (what models/clip.py now does on load: open_clip's
    batch-first attention hands F.linear a strided (L, N, D) view, x1.3 slower on CPU in fp32 and x8
    under bf16 autocast for N > 1). Returns how many transformers it switched."""
    trs = [tr for tr in clip_transformers(model) if tr.batch_first]
    for tr in trs:
        tr.batch_first = False
        for block in tr.resblocks:
            block.attn.batch_first = False
    return len(trs)


def clip_transformers(model) -> list:
    """open_clip's Transformer modules of a CLIP (image and text towers; none for a ResNet image tower)."""
    return [tr for tr in (getattr(getattr(model, "visual", None), "transformer", None),
                          getattr(model, "transformer", None))
            if tr is not None and hasattr(tr, "batch_first") and hasattr(tr, "resblocks")]


def set_batch_first(model, value: bool) -> int:
    """Run open_clip's transformers batch-first (True, open_clip's default) or sequence-first (False)."""
    trs = clip_transformers(model)
    for tr in trs:
        tr.batch_first = value
        for block in tr.resblocks:
            block.attn.batch_first = value
    return len(trs)


def split_clip_calls(clip, n: int):
    """The engine change this benchmark proposes, applied to this ClipModel instance only (no engine file
    is touched): encode_image runs CLIP on at most n images per call."""
    encode = type(clip).encode_image

    def encode_image(x):
        if x.shape[0] <= n:
            return encode(clip, x)
        return torch.cat([encode(clip, part) for part in x.split(n)])
    clip.encode_image = encode_image


def chunked_loss(guide, x0, x, fac, mask, mats, chunk):
    """guidance_loss's CLIP + range terms with CLIP called on ``chunk`` views at a time."""
    import torch.nn.functional as F
    from blended_diffusion.models.augment import extending_augmentations
    from blended_diffusion.models.clip import d_clip
    clip = guide.clip
    x_in = x0 * fac + x * (1 - fac)
    masked = F.interpolate(x_in * mask, size=(clip.input_size,) * 2, mode="bilinear", align_corners=False,
                           antialias=True)
    views = extending_augmentations(masked, mats)
    emb = torch.cat([clip.encode_image(clip.preprocess(v)) for v in views.split(chunk)])
    dist = d_clip(emb, clip.encode_text(guide.prompt)).view(x.shape[0], -1).mean(1)
    loss = dist.sum() * guide.clip_lambda
    return loss + (x0 - x0.clamp(-1, 1)).pow(2).mean((1, 2, 3)).sum() * guide.range_lambda


# ---------------------------------------------------------------- one configuration
def run_config(name: str, args, ckpt_dir: Path) -> dict:
    load_pack()
    from blended_diffusion.models import AugmentSettings, ClipModel, Guide, generators, load_clip, load_ddpm
    from blended_diffusion.models.blended import blended_diffusion
    dev = torch.device(args.device)
    unet_path, clip_path = write_checkpoints(name, ckpt_dir)
    t0 = time.perf_counter()
    ddpm = load_ddpm(str(unet_path), respacing="100", precision=args.precision, device=dev)
    clip = load_clip(str(clip_path), device=dev, precision=args.clip_precision or args.precision)
    sync(dev)
    load_s = time.perf_counter() - t0
    if args.clip_views_per_call:
        split_clip_calls(clip, args.clip_views_per_call)
    if args.clip_seq_first:
        sequence_first(clip.model)
    if args.channels_last:
        ddpm.model.to(memory_format=torch.channels_last)
    if args.compile:
        ddpm.model = torch.compile(ddpm.model)
        clip.model.visual = torch.compile(clip.model.visual)

    s = ddpm.image_size
    b = args.batch
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    source = (torch.stack([gx, gy, gx * gy]) * 0.8)[None].expand(b, 3, s, s).contiguous().to(dev)
    mask = torch.zeros(1, 1, s, s, device=dev)
    mask[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 1
    if args.channels_last:
        source = source.contiguous(memory_format=torch.channels_last)
    aug = AugmentSettings(num_views=args.views)
    prompt = "a red ball on the grass"
    guide = Guide(clip=clip, prompt=prompt, augment=aug)
    fast_guide = Guide(clip=clip, prompt=prompt, augment=aug, fast=True)
    gens = generators(404, 0, b)
    bench = Bench(ddpm, clip, guide, fast_guide, source, mask, gens, step_index=50,
                  channels_last=args.channels_last)

    lever_guides = {}
    if not args.no_levers and clip.precision != "bf16":  # CLIP in bf16 autocast, same weights
        lever_guides["clip_aug_bf16"] = Guide(clip=ClipModel(clip.model, clip.path, "bf16"), prompt=prompt,
                                              augment=aug)
    trs = clip_transformers(clip.model)
    if not args.no_levers and trs and not any(tr.batch_first for tr in trs):  # the old loader's layout
        bf = copy.deepcopy(clip.model)
        set_batch_first(bf, True)
        lever_guides["clip_aug_batch_first"] = Guide(clip=ClipModel(bf, clip.path, clip.precision),
                                                     prompt=prompt, augment=aug)
    total = args.warmup + args.steps
    if total > ddpm.num_steps:
        raise SystemExit(f"--warmup + --steps = {total} is more than the {ddpm.num_steps} respaced steps")
    ours: list[float] = []
    state = {"t": now(dev)}

    def callback(step, k, x0):
        ours.append(now(dev) - state["t"])
        bench.peak("ours")
        bench.round(not args.no_levers, args.view_chunks, lever_guides)
        if step < k:
            cuda_peak_reset(dev)
        state["t"] = now(dev)

    cuda_peak_reset(dev)
    state["t"] = now(dev)
    blended_diffusion(ddpm, source, mask, guide, total, gens, callback=callback)

    w = args.warmup
    stat = statistics.median if args.stat == "median" else min
    t = {key: stat(v[w:]) for key, v in bench.times.items()}
    t["ours"] = stat(ours[w:])
    cpu_peak = cpu_peak_mib()
    peak = (lambda m: bench.peaks.get(m, float("nan"))) if dev.type == "cuda" else (lambda m: cpu_peak)
    bare = t["bare"]
    ref = t["reference"]
    nan = float("nan")

    def row(mode, s_step, fwd, bwd, clip_t, blend_t):
        pieces = [p for p in (fwd, bwd, clip_t, blend_t) if not math.isnan(p)]
        return dict(mode=mode, s_step=s_step, unet_fwd=fwd, unet_bwd=bwd, clip_aug=clip_t, blend=blend_t,
                    other=s_step - sum(pieces) if mode != "bare" else nan,
                    s_result=s_step * RESULT_STEPS / b if mode != "bare" else nan,
                    peak_mib=peak(mode), x_bare=s_step / bare, x_reference=s_step / ref)

    rows = [
        row("bare", bare, t["unet_fwd"], t["unet_bwd"], nan, nan),
        row("ours", t["ours"], t["unet_fwd"], t["unet_bwd"], t["clip_aug"], t["blend"]),
        row("reference", ref, t["unet_fwd_nograd"] + t["unet_fwd"], t["unet_bwd"], t["clip_aug"], t["blend"]),
        row("fast", t["fast"], t["unet_fwd_nograd"], 0.0, t["clip_aug"], t["blend"]),
    ]
    levers = [dict(lever="model loading (once; kept loaded between prompts)", seconds=load_s,
                   note="saved on every later prompt")]
    if not args.no_levers:
        def instead(seconds):  # ours with the CLIP+aug piece replaced by this one
            return f"ours would be x{(t['ours'] - t['clip_aug'] + seconds) / bare:.3f} bare f+b (estimate)"
        levers.append(dict(lever="text encoder on an uncached prompt", seconds=t["text_encode"],
                           note=f"cached: 0 per step; re-encoding every step: ours "
                                f"x{(t['ours'] + t['text_encode']) / bare:.3f} bare f+b (estimate)"))
        for chunk in args.view_chunks:
            sec = t[f"clip_aug_chunk{chunk}"]
            levers.append(dict(lever=f"CLIP+aug, CLIP on {chunk} view(s) per call", seconds=sec,
                               note=f"x{sec / t['clip_aug']:.2f} the one call for all views; {instead(sec)}"))
        if "clip_aug_batch_first" in t:
            sec = t["clip_aug_batch_first"]
            levers.append(dict(lever="CLIP+aug, batch-first CLIP transformers (the loader before 416dc05)",
                               seconds=sec, note=f"x{sec / t['clip_aug']:.2f} the sequence-first CLIP; "
                                                 f"{instead(sec)}"))
        if "clip_aug_bf16" in t:
            sec = t["clip_aug_bf16"]
            levers.append(dict(lever="CLIP+aug, CLIP in bf16 autocast", seconds=sec,
                               note=f"x{sec / t['clip_aug']:.2f} the {clip.precision} CLIP; {instead(sec)}"))
    per_round = [o / r for o, r in zip(ours[w:], bench.times["bare"][w:])]
    return dict(config=name, desc=CONFIGS[name]["desc"], device=str(dev), precision=args.precision,
                clock=args.clock, stat=args.stat, clip_views_per_call=args.clip_views_per_call,
                clip_seq_first=args.clip_seq_first, keep_freed_memory=args.keep_freed_memory,
                batch=b, views=args.views, steps=args.steps, warmup=args.warmup,
                channels_last=args.channels_last, compile=args.compile, threads=torch.get_num_threads(),
                clip_precision=clip.precision, ratio_per_step=per_round,
                rows=rows, levers=levers, raw={k: v for k, v in bench.times.items()} | {"ours": ours})


# ---------------------------------------------------------------- output
def fmt(v, digits=3):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_table(res: dict) -> str:
    head = (f"config {res['config']}: {res['desc']}\n"
            f"device {res['device']} ({res['threads']} threads), UNet {res['precision']}, "
            f"CLIP {res['clip_precision']}, batch {res['batch']}, "
            f"CLIP views per call {res['clip_views_per_call'] or 'all'}, "
            f"CLIP sequence-first {res['clip_seq_first']}, keep freed memory {res['keep_freed_memory']}, "
            f"{res['views']} views, channels_last {res['channels_last']}, compile {res['compile']}, "
            f"{res['stat']} of {res['steps']} steps after {res['warmup']} warm-up, {res['clock']} clock")
    names = ("mode", "s/step", "UNet fwd", "UNet bwd", "CLIP+aug", "blend", "other",
             f"s/result ({RESULT_STEPS} steps)", "peak MiB", "x bare f+b", "x reference")
    lines = [head, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in res["rows"]:
        cells = [r["mode"]] + [fmt(r[c], 1 if c == "peak_mib" else 3) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if res["levers"]:
        lines += ["", "| lever | seconds | note |", "|---|---|---|"]
        lines += [f"| {lv['lever']} | {fmt(lv['seconds'])} | {lv['note']} |" for lv in res["levers"]]
    ours = res["rows"][1]
    lines += ["", f"guided step / bare UNet fwd+bwd = {ours['x_bare']:.3f} "
                  f"(reference: {res['rows'][2]['x_bare']:.3f}, fast: {res['rows'][3]['x_bare']:.3f}); "
                  f"ours / reference = {ours['x_reference']:.3f}",
              "ours / bare, step by step (each step against the bare f+b timed right after it): "
              + ", ".join(f"{r:.3f}" for r in res["ratio_per_step"])]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help="real, small, tiny, or a comma-separated list")
    p.add_argument("--steps", type=int, default=3, help="timed steps (rounds) after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, discarded")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--views", type=int, default=8, help="augmentation views per result")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--clip-precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="CLIP's precision (default: --precision)")
    p.add_argument("--clip-views-per-call", type=int, default=0,
                   help="proposed engine change, patched onto the loaded ClipModel: CLIP encodes at most "
                        "this many views per call (0: the engine as it is, all views in one call)")
    p.add_argument("--clip-seq-first", action="store_true",
                   help="sequence-first CLIP transformers (no strided batch-first attention inputs); "
                        "models/clip.py now does this itself, so this flag changes nothing")
    p.add_argument("--view-chunks", default="1",
                   help="lever: CLIP+aug timed with CLIP called on this many views at a time (comma list)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the CLIP image tower")
    p.add_argument("--channels-last", action="store_true", help="UNet weights and inputs in channels_last")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCK),
                   help="wall: elapsed time; cpu: process CPU time (all threads), steadier on a shared "
                        "CPU machine, best with --threads 1 (CPU only)")
    p.add_argument("--stat", default="median", choices=("median", "min"),
                   help="how the timed steps are summarised (min resists load from other processes)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU lever: glibc keeps freed memory in the process (no page faults every step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-levers", action="store_true",
                   help="skip the lever rows (CLIP in chunks of views, CLIP in bf16, uncached text)")
    p.add_argument("--ckpt-dir", default=None,
                   help="keep the random-weight checkpoints here and reuse them (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        args.view_chunks = tuple(int(c) for c in args.view_chunks.split(",") if c.strip())
    except ValueError:
        p.error(f"--view-chunks {args.view_chunks!r}: give view counts, e.g. 1,2,4")
    args.config = [c.strip() for c in args.config.split(",") if c.strip()]
    for c in args.config:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; use one of {', '.join(CONFIGS)}")
    if args.clock == "cpu" and args.device.startswith("cuda"):
        p.error("--clock cpu measures host CPU time: use it with --device cpu")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.views < 1:
        p.error("--steps, --batch and --views must be at least 1, --warmup at least 0")
    return args


def main(argv=None) -> list[dict]:
    """Run the configurations, print a table for each, return the results (dicts)."""
    global _clock
    args = parse_args(argv)
    threads = torch.get_num_threads()
    results = []
    try:
        _clock = CLOCK[args.clock]
        if args.threads:
            torch.set_num_threads(args.threads)
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="bd_bench_") as tmp, \
                keep_freed_memory(args.keep_freed_memory):
            warnings.filterwarnings("ignore", category=FutureWarning, module=".*guided_diffusion")
            ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else Path(tmp)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for name in args.config:
                res = run_config(name, args, ckpt_dir)
                results.append(res)
                print(format_table(res) + "\n", flush=True)
    finally:
        torch.set_num_threads(threads)
        _clock = CLOCK["wall"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
