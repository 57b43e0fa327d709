"""Benchmark of NULL-text inversion (and the other inversion methods) and editing on Stable Diffusion 1.5's and
SDXL's real architectures (issues 7 and 14). Not part of the pass/fail suite. Needs ComfyUI (``--comfyui DIR`` or
``COMFYUI_PATH``) and its interpreter:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/benchmark_nulltext.py --size 256 --steps 5 --threads 1
    python tests/benchmark_nulltext.py --comfyui /path/to/ComfyUI --device cuda --size 512 --steps 50
    python tests/benchmark_nulltext.py --config sdxl --size 256 --steps 2 --inner-steps 2 --threads 1 \
        --method null-text,direct --json xl.json    # SDXL base, two methods
    python tests/benchmark_nulltext.py --from-json run.json [--from-json other.json]  # saved runs, one table

The models are ComfyUI's own classes at SD1.5's sizes with seeded random weights (no weights are downloaded;
ComfyUI's layers skip init, so every parameter is set like tests/test_nulltext_nodes.py's ``_randomize``):
- UNet: ``comfy.supported_models.SD15`` with the unet config ComfyUI detects from an SD1.5 checkpoint
  (model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2, transformer depth 1 on the first three
  levels and the middle, context 768, 8 heads; 860 M parameters; checked with comfy.model_detection), dtype
  chosen by comfy.model_management as when a checkpoint is loaded, in a ``ModelPatcher``;
- text encoder: ``comfy.sd.CLIP`` with ``comfy.sd1_clip`` (CLIP ViT-L/14's text model, its default config);
- VAE: ``comfy.sd.VAE`` from the state dict of an SD ``AutoencoderKL`` (ch 128, ch_mult [1, 2, 4, 4]; ComfyUI
  recognises it as the SD1.x/SD2.x VAE).
``--config sdxl``: ComfyUI's SDXL base at its real sizes (``comfy.supported_models.SDXL`` with the unet config
ComfyUI detects from an SDXL base checkpoint: model_channels 320, channel_mult [1, 2, 4], transformer depth 2 and
10, context 2048, adm 2816, 64-channel heads; 2.6 G parameters; checked with comfy.model_detection), both text
encoders (``comfy.sdxl_clip.SDXLClipModel``: CLIP-L and CLIP-G, their default configs) and the SDXL VAE (the
same AutoencoderKL architecture as SD's; SDXL's latent scale comes with the model). Conditioning as the nodes
build it (``SDModel.condition``: context and ``y``).
``--config tiny`` / ``--config tinyxl`` use tiny models instead (tests/test_nulltext_nodes.py's SD1.5 and
tests/tiny_models.py's SDXL; a quick check of the script).

``--method`` (repeatable, or a comma list; models.inversion.METHODS; default null-text) runs NullTextInvert with
each method in turn, each followed by its own edit and SDEdit, in one process (the models are built once); each
method gets its rows and its 50-step figures, and a table compares them.

What is timed: the pack's nodes themselves, as ComfyUI calls them (a fresh instance, inside
``torch.inference_mode()``): NullTextInvert (its stages: DDIM inversion, the method's pass — NULL-text
optimisation, or Direct Inversion's corrected pass, which is its reconstruction; none for Negative-Prompt
Inversion — and the reconstruction), NullTextEdit (prompt-to-prompt, replace: the source and the edit in one batch of 2, with CFG
a UNet batch of 4), NullTextSDEdit at t0 0.6 (from the inversion). The stages are timed by wrapping the core
functions the nodes call (models.nulltext.ddim_invert / null_text_optimize / null_text_optimize_global /
direct_inversion_offsets / ddim_sample_cfg) and
``SDModel.eps`` (UNet calls: how many, at which batch, with or without autograd; the Adam steps the
optimisation actually took are its UNet calls with autograd). Both clocks are recorded; the table shows
``--clock`` (cpu: process CPU time, all threads, which on a CPU shared with other work does not count the
time other processes take; wall: elapsed time). "other" in a node's row is the node's time outside its
sampling stages: text encoding, VAE encode/decode, loading, the previews.

Weights are random: the cost of a UNet call does not depend on their values, but the number of Adam steps
NULL-text optimisation takes before its early stop does, and with random weights it is not representative.
The 50-step estimates are therefore given both with the measured Adam steps and with none stopped early.
Peak memory: the process's peak RSS (ru_maxrss) on the CPU, max allocated on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a photo of a cat"
TARGET = "a photo of a dog"
T0 = 0.6
GUIDANCE = 7.5
PAPER_STEPS = 50
PAPER_INNER = 10  # the paper's Adam steps per DDIM step (before the early stop)

# The unet config comfy.model_detection.detect_unet_config gives for an SD1.5 checkpoint (SD15 adds
# num_heads 8, num_head_channels -1).
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
             "use_temporal_resblock": False, "use_temporal_attention": False}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# tests/test_nulltext_nodes.py's tiny models
from tiny_sd import TINY_TEXT, TINY_UNET, TINY_VAE  # noqa: E402

# The unet config comfy.model_detection gives for an SDXL base checkpoint (its ``unet_config_from_diffusers_unet``
# SDXL entry; checked against detection of the built model's state dict in build_model).
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
             "use_temporal_resblock": False}
FULL = ("sd15", "sdxl")  # the configs at real sizes
XL = ("sdxl", "tinyxl")  # SDXL-family configs (two text encoders, the vector y)

CONFIGS = {
    "sd15": "SD1.5 architecture: UNet 320 ch, mult 1,2,4,4, 2 res blocks, context 768, 8 heads; CLIP ViT-L/14 "
            "text model; SD VAE ch 128, mult 1,2,4,4 (random weights)",
    "tiny": "tests/test_nulltext_nodes.py's tiny models (UNet 32 ch, 2 levels, context 64; 2-layer text model; "
            "32-channel VAE; random weights)",
    "sdxl": "SDXL base architecture: UNet 320 ch, mult 1,2,4, transformer depth 2/10, context 2048, adm 2816; "
            "CLIP-L + CLIP-G text models; SDXL VAE ch 128, mult 1,2,4,4 (random weights)",
    "tinyxl": "tests/tiny_models.py's tiny SDXL (model_base.SDXL, 3-level 32/64-ch UNet, context 128; tiny CLIP-L "
              "+ CLIP-G; 32-channel VAE; random weights)",
}


def comfyui_dir(arg: str | None) -> Path:
    d = arg or os.environ.get("COMFYUI_PATH", "")
    if not d:
        raise SystemExit("benchmark_nulltext.py needs ComfyUI: pass --comfyui DIR or set COMFYUI_PATH to a "
                         "ComfyUI checkout (and run with that ComfyUI's Python interpreter)")
    p = Path(d).expanduser().resolve()
    if not (p / "comfy" / "model_base.py").is_file():
        raise SystemExit(f"{p} is not a ComfyUI checkout (no comfy/model_base.py): pass --comfyui DIR or set "
                         "COMFYUI_PATH to one")
    return p


def import_comfy(path: Path, device: str):
    """Import ComfyUI's modules (CPU mode before comfy.model_management is imported, as main.py --cpu)."""
    if str(path) not in sys.path:
        sys.path.append(str(path))
    try:
        from comfy.cli_args import args as comfy_args
        if device == "cpu":
            comfy_args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.model_detection  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.sd1_clip  # noqa: F401
        import comfy.sdxl_clip  # noqa: F401
        import comfy.supported_models  # noqa: F401
        import comfy.supported_models_base  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ComfyUI at {path} does not import with this interpreter ({e}): run the benchmark "
                         "with ComfyUI's Python") from None
    import comfy
    return comfy


# ---------------------------------------------------------------- models (ComfyUI's classes, random weights)
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded values for ComfyUI's uninitialised layers (tests/tiny_sd.py's, without scales)."""
    import tiny_sd
    tiny_sd._randomize(module, torch.Generator().manual_seed(seed))


def _text_info(clip) -> dict:
    by_dtype = {}
    for p in clip.cond_stage_model.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel()
    total = sum(by_dtype.values())
    dtypes = ", ".join(f"{d} {n / total:.0%}" for d, n in sorted(by_dtype.items(), key=lambda x: -x[1]))
    return dict(text_params_m=total / 1e6, text_dtype=dtypes)


def _unet_info(model) -> dict:
    unet = model.model.diffusion_model
    return dict(unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
                unet_dtype=str(next(unet.parameters()).dtype))


def build_models(comfy, config: str):
    """(MODEL, CLIP, VAE, info) of the config, as Load Checkpoint would give them."""
    if config == "tinyxl":
        import tiny_models
        model, clip, vae = tiny_models.tiny_sdxl()
        n_vae = sum(p.numel() for p in vae.first_stage_model.parameters())
        return model, clip, vae, dict(**_unet_info(model), **_text_info(clip), vae_params_m=n_vae / 1e6,
                                      vae_dtype=str(vae.vae_dtype))
    model, minfo = build_model(comfy, config)
    clip, cinfo = build_clip(comfy, config)
    vae, vinfo = build_vae(comfy, config)
    return model, clip, vae, dict(**minfo, **cinfo, **vinfo)


def build_model(comfy, config: str):
    mm = comfy.model_management
    xl = config == "sdxl"
    cfg = (comfy.supported_models.SDXL(dict(SDXL_UNET)) if xl else
           comfy.supported_models.SD15(dict(SD15_UNET if config == "sd15" else TINY_UNET)))
    if config == "tiny":
        cfg.unet_config["num_heads"] = 2
    params = 2_567_000_000 if xl else 860_000_000 if config == "sd15" else 1_000_000
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=cfg.supported_inference_dtypes)
    load_device = mm.get_torch_device()
    cfg.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, cfg.supported_inference_dtypes))
    base = cfg.get_model({})
    randomize(base.diffusion_model, 0)
    if config in FULL:  # ComfyUI would build the same model from a real checkpoint's keys and shapes
        want = "SDXL" if xl else "SD15"
        sd = {"model.diffusion_model." + k: v for k, v in base.diffusion_model.state_dict().items()}
        detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        if type(detected).__name__ != want or any(detected.unet_config.get(k) != v
                                                  for k, v in cfg.unet_config.items() if k != "dtype"):
            raise SystemExit(f"the UNet built is not what ComfyUI detects as {want}: "
                             f"{detected and detected.unet_config}")
        del sd
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    return patcher, _unet_info(patcher)


def build_clip(comfy, config: str):
    if config == "sdxl":  # both text encoders, their default configs
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        opts = {}
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        opts = {} if config == "sd15" else {"clip_l_model_config": dict(TINY_TEXT)}
    clip = comfy.sd.CLIP(target, model_options=opts)
    randomize(clip.cond_stage_model, 1)
    return clip, _text_info(clip)


def build_vae(comfy, config: str):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = dict(SD_VAE if config in FULL else TINY_VAE)
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    randomize(ae, 2)
    # sd15 / sdxl: no config, so ComfyUI recognises the state dict as the SD/SDXL VAE (one architecture; the
    # latent scale is the model's), as from a checkpoint
    vae = comfy.sd.VAE(sd=ae.state_dict(), config=None if config in FULL else
                       {"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    n = sum(p.numel() for p in ae.parameters())
    del ae
    return vae, dict(vae_params_m=n / 1e6, vae_dtype=str(vae.vae_dtype))


def test_image(size: int) -> torch.Tensor:
    """A smooth IMAGE [1, size, size, 3] with a red rectangle (as the node tests)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, 1 - (xx + yy) / 2], -1)[None] * 0.8 + 0.1
    img[:, size * 5 // 16: size * 11 // 16, size * 3 // 8: size * 5 // 8] = torch.tensor([0.9, 0.2, 0.2])
    return img


# ---------------------------------------------------------------- timing the node code
class Probe:
    """Wraps the core functions the nodes call and SDModel.eps for the run only (restored after): records
    each stage's times (cpu and wall clock) and its UNet calls."""

    STAGED = ("ddim_invert", "null_text_optimize", "null_text_optimize_global", "direct_inversion_offsets",
              "ddim_sample_cfg")

    def __init__(self, nt, host_sd, device: torch.device):
        self.nt, self.host_sd, self.dev = nt, host_sd, device
        self.node = None
        self.stages: list[dict] = []   # one per call of a wrapped core function
        self.current: dict | None = None

    def clocks(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.process_time(), time.perf_counter()

    def _wrap_stage(self, name, fn):
        probe = self

        def wrapped(*args, **kw):
            outer = probe.current
            rec = dict(node=probe.node, fn=name, calls=[], steps=None)
            if outer is None:  # nested calls (sdedit → ddim_sample_cfg) are counted in the outer stage
                probe.current = rec
            c0, w0 = probe.clocks()
            try:
                return fn(*args, **kw)
            finally:
                c1, w1 = probe.clocks()
                if outer is None:
                    rec.update(cpu=c1 - c0, wall=w1 - w0)
                    probe.stages.append(rec)
                    probe.current = None
        return wrapped

    def _wrap_eps(self, fn):
        probe = self

        def eps(sd, x, t, context):
            c0, w0 = probe.clocks()
            out = fn(sd, x, t, context)
            c1, w1 = probe.clocks()
            if probe.current is not None:
                probe.current["calls"].append(dict(batch=int(x.shape[0]), grad=torch.is_grad_enabled(),
                                                   cpu=c1 - c0, wall=w1 - w0))
            return out
        return eps

    @contextlib.contextmanager
    def installed(self):
        saved = {n: getattr(self.nt, n) for n in self.STAGED}
        eps = self.host_sd.SDModel.eps
        try:
            for n, fn in saved.items():
                setattr(self.nt, n, self._wrap_stage(n, fn))
            self.host_sd.SDModel.eps = self._wrap_eps(eps)
            yield self
        finally:
            for n, fn in saved.items():
                setattr(self.nt, n, fn)
            self.host_sd.SDModel.eps = eps

    def run_node(self, node_type: str, **kw):
        """One node call as ComfyUI makes it (a fresh instance, inference mode); returns (result, record)."""
        from blended_diffusion.nodes import NODE_CLASS_MAPPINGS
        cls = NODE_CLASS_MAPPINGS[node_type]
        self.node = node_type
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        c0, w0 = self.clocks()
        with torch.inference_mode():
            out = getattr(cls(), cls.FUNCTION)(**kw)
        c1, w1 = self.clocks()
        self.node = None
        rec = dict(node=node_type, cpu=c1 - c0, wall=w1 - w0, peak_mib=peak_mib(self.dev),
                   stages=[s for s in self.stages if s["node"] == node_type])
        return (out["result"] if isinstance(out, dict) else out), rec


def peak_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- the run
def run(args) -> list[dict]:
    """One record per method (``args.methods``): NullTextInvert with it, then an edit and an SDEdit from it."""
    comfy = import_comfy(comfyui_dir(args.comfyui), args.device)
    from pack import load_pack
    load_pack()
    from blended_diffusion.models import nulltext as nt
    from blended_diffusion.host import sd as host_sd
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode():  # ComfyUI builds models inside inference mode too
        model, clip, vae, info = build_models(comfy, args.config)
    build_s = time.perf_counter() - t0
    rss_models = rss_mib()
    size = args.size
    image = test_image(size)
    probe = Probe(nt, host_sd, dev)
    out = []
    with probe.installed():
        # warm-up, not timed: one UNet call and one text encoding (first-call costs)
        with torch.inference_mode():
            sdm = host_sd.SDModel(model)
            z = torch.zeros(1, 4, size // 8, size // 8, device=sdm.device)
            sdm.eps(z, torch.tensor([500], device=sdm.device), sdm.condition(clip, PROMPT, z).to(sdm.device))
            del sdm, z
        for method in args.methods:
            probe.stages = []
            (inv, _recon, report), r_inv = probe.run_node(
                "NullTextInvert", model=model, clip=clip, vae=vae, image=image, prompt=PROMPT, steps=args.steps,
                guidance=GUIDANCE, inner_steps=args.inner_steps, global_null=False, method=method)
            (edit,), r_edit = probe.run_node(
                "NullTextEdit", model=model, clip=clip, vae=vae, inversion=inv, target_prompt=TARGET,
                mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4, guidance=GUIDANCE)
            (sde,), r_sde = probe.run_node(
                "NullTextSDEdit", model=model, clip=clip, vae=vae, inversion=inv, target_prompt=TARGET, t0=T0,
                start="inversion", guidance=GUIDANCE)
            report = json.loads(report)
            for img, name in ((edit, "NullTextEdit"), (sde, "NullTextSDEdit")):
                if not torch.isfinite(img).all():
                    raise SystemExit(f"{name} returned non-finite pixels ({method})")
            res = summarize(args.clock, dict(
                config=args.config, desc=CONFIGS[args.config], method=method, device=str(dev), size=size,
                latent=size // 8, steps=args.steps, inner_steps=args.inner_steps, threads=torch.get_num_threads(),
                clock=args.clock, build_s=build_s, rss_after_build_mib=rss_models, **info,
                latent_mse=report.get("latent_mse"), final_losses=report.get("final_losses"),
                node_report={k: report.get(k) for k in ("ddim_inversion_s", "null_text_s", "inversion_method_s",
                                                        "reconstruction_s", "total_s")},
                nodes=[r_inv, r_edit, r_sde]))
            print(format_table(res), "", sep="\n", flush=True)  # each method's table as soon as it is done
            out.append(res)
            if args.json:  # after each method: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(out[0] if len(out) == 1 else {"runs": out}, indent=1,
                                                      default=str))
    return out


def summarize(clock: str, res: dict) -> dict:
    """Per-step figures (res["rows"]) and the 50-step estimates (res["estimate"]) from the records of one method's
    run (runs saved before methods existed are NULL-text's)."""
    method = res.setdefault("method", "null-text")
    inv, edit, sde = res["nodes"]
    st = {s["fn"]: s for s in inv["stages"]}
    d_inv, d_rec = st["ddim_invert"], st.get("ddim_sample_cfg")
    d_opt = st.get("null_text_optimize") or st.get("null_text_optimize_global")
    d_dir = st.get("direct_inversion_offsets")
    (d_edit,) = edit["stages"]
    (d_sde,) = sde["stages"]
    n = res["steps"]
    n_sde = len(d_sde["calls"])
    adam = [c for c in d_opt["calls"] if c["grad"]] if d_opt else []
    plain = [c for c in d_opt["calls"] if not c["grad"]] if d_opt else []
    fwd1 = sum(c[clock] for c in plain) / len(plain) if plain else float("nan")  # batch 1, no autograd
    adam_s = (d_opt[clock] - sum(c[clock] for c in plain)) / len(adam) if adam else float("nan")

    def batches(stage):
        return sorted({c["batch"] for c in stage["calls"]})

    def row(key, what, stage, count, per="DDIM step"):
        return dict(key=key, what=what, per=per, count=count, seconds=stage[clock], per_step=stage[clock] / count,
                    unet_batch=batches(stage), calls=len(stage["calls"]))

    rows = [row("inversion", "DDIM inversion (guidance 1)", d_inv, n)]
    is_global = method == "null-text global"
    if d_opt:
        what = (f"NULL-text global optimisation ({res['inner_steps']} passes over the steps, one Adam step per step "
                f"and pass)" if is_global else
                f"NULL-text optimisation ({len(adam)} Adam steps in all, {len(adam) / n:.1f} per step, "
                f"at most {res['inner_steps']})")
        rows.append(row("method", what, d_opt, n))
        rows.append(dict(key="adam", what="  of which one Adam step (UNet fwd with autograd + bwd + update)",
                         per="Adam step", count=len(adam), seconds=adam_s * len(adam), per_step=adam_s,
                         unet_batch=[1], calls=len(adam)))
    if d_dir:
        rows.append(row("method", "Direct Inversion pass (CFG; the corrections; it is the reconstruction)", d_dir, n))
    if d_rec:
        rows.append(row("reconstruction", "reconstruction (cond only: the null embedding is the caption's)"
                        if method == "negative-prompt" else "reconstruction (CFG)", d_rec, n))
    rows.append(row("edit", "prompt-to-prompt edit (source + edit, CFG)", d_edit, n))
    rows.append(row("sdedit", f"SDEdit t0 {T0} (from the inversion, CFG)", d_sde, max(n_sde, 1)))
    by = {r["key"]: r for r in rows}
    other = {r["node"]: r[clock] - sum(s[clock] for s in r["stages"]) for r in res["nodes"]}
    steps_adam = ([len(adam) // n] * n if is_global else per_step_adam(d_opt)) if d_opt else []
    early = [k for k, c in enumerate(steps_adam) if c < res["inner_steps"]] if method == "null-text" else []
    per_step = sum(by[k]["per_step"] for k in ("inversion", "method", "reconstruction") if k in by)
    est_inv = PAPER_STEPS * per_step + other["NullTextInvert"]
    if d_opt:  # the paper's 10 Adam steps at every step (no early stop), or 10 passes of the global one
        est_full = PAPER_STEPS * (by["inversion"]["per_step"] + by["reconstruction"]["per_step"]
                                  + (PAPER_INNER * (2 * fwd1 + adam_s) if is_global else
                                     2 * fwd1 + PAPER_INNER * adam_s)) + other["NullTextInvert"]
    else:
        est_full = est_inv
    sde_steps = max(1, round(T0 * PAPER_STEPS))
    res.update(rows=rows, other=other, adam_steps_per_step=steps_adam, early_stops=len(early),
               fwd1_s=fwd1, adam_step_s=adam_s,
               estimate=dict(inversion_s=est_inv, inversion_no_early_stop_s=est_full,
                             edit_s=PAPER_STEPS * by["edit"]["per_step"] + other["NullTextEdit"],
                             sdedit_s=sde_steps * by["sdedit"]["per_step"] + other["NullTextSDEdit"],
                             sdedit_steps=sde_steps),
               total_s=sum(r[clock] for r in res["nodes"]), peak_mib=max(r["peak_mib"] for r in res["nodes"]))
    return res


def per_step_adam(stage: dict) -> list[int]:
    """Adam steps of each DDIM step: the UNet calls with autograd between two without (each step makes one
    call without autograd before its Adam steps and one after)."""
    out, k, plain = [], 0, 0
    for c in stage["calls"]:
        if c["grad"]:
            k += 1
        else:
            plain += 1
            if plain % 2 == 0:
                out.append(k)
                k = 0
    return out


# ---------------------------------------------------------------- output
def fmt(v, digits=2):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_table(res: dict) -> str:
    clock = "process CPU time (all threads)" if res["clock"] == "cpu" else "wall-clock time"
    head = (f"config {res['config']}: {res['desc']}\n"
            f"UNet {res['unet_params_m']:.1f} M params ({res['unet_dtype']}), text encoder "
            f"{res['text_params_m']:.1f} M ({res['text_dtype']}), VAE {res['vae_params_m']:.1f} M "
            f"({res['vae_dtype']})\n"
            f"method {res['method']}; device {res['device']} ({res['threads']} threads), image {res['size']}x"
            f"{res['size']} (latent {res['latent']}x{res['latent']}), {res['steps']} DDIM steps, guidance {GUIDANCE}, "
            f"inner steps {res['inner_steps']}; clock: {clock}")
    lines = [head, "", f"| stage | s per step ({res['clock']} clock) | steps | s in all | UNet calls (batch) |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['what']} | {fmt(r['per_step'], 3)} per {r['per']} | {r['count']} | {fmt(r['seconds'])} | "
                     f"{r['calls']} ({','.join(map(str, r['unet_batch']))}) |")
    lines += ["", f"| node | s in all ({res['clock']} clock) | wall s | of which other (text encoder, VAE, "
                  f"loading, previews) | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in res["nodes"]:
        lines.append(f"| {r['node']} | {fmt(r[res['clock']])} | {fmt(r['wall'])} | {fmt(res['other'][r['node']])} "
                     f"| {fmt(r['peak_mib'], 0)} |")
    e = res["estimate"]
    lines += ["",
              f"total for the run (3 nodes): {fmt(res['total_s'], 1)} s ({res['clock']} clock); peak "
              f"{'RSS' if res['device'] == 'cpu' else 'allocated'} {fmt(res['peak_mib'], 0)} MiB "
              f"(RSS with the models built, before the nodes: {fmt(res['rss_after_build_mib'], 0)} MiB; the RSS "
              "peak is the process's so far)"]
    if res["method"] == "null-text":
        lines.append(f"Adam steps taken per DDIM step: {res['adam_steps_per_step']} (early stop in {res['early_stops']} "
                     f"of {res['steps']} steps; random weights: not representative of a trained model)")
    if res["adam_steps_per_step"]:
        lines.append(f"a UNet call at batch 1 without autograd: {fmt(res['fwd1_s'])} s; an Adam step: "
                     f"{fmt(res['adam_step_s'])} s")
    lines.append(f"latent MSE of the reconstruction: {res['latent_mse']:.3g} (random weights: no measure of quality)")
    if res["method"] == "null-text":
        inv = (f"inversion ≈ {fmt(e['inversion_s'], 0)} s with the Adam steps taken here "
               f"({sum(res['adam_steps_per_step']) / res['steps']:.1f} per step, at most {res['inner_steps']}), ≈ "
               f"{fmt(e['inversion_no_early_stop_s'], 0)} s with {PAPER_INNER} Adam steps every step (no early stop)")
    elif res["method"] == "null-text global":
        inv = (f"inversion ≈ {fmt(e['inversion_s'], 0)} s with the {res['inner_steps']} passes run here, ≈ "
               f"{fmt(e['inversion_no_early_stop_s'], 0)} s with {PAPER_INNER} passes")
    else:
        inv = f"inversion ≈ {fmt(e['inversion_s'], 0)} s (no optimisation)"
    lines += ["", f"computed from the per-step figures above (not measured), for {PAPER_STEPS} steps at this image "
                  f"size: {inv}; each prompt-to-prompt edit ≈ {fmt(e['edit_s'], 0)} s; each SDEdit at t0 {T0} "
                  f"({e['sdedit_steps']} steps) ≈ {fmt(e['sdedit_s'], 0)} s (each including the node's other costs "
                  f"measured here)"]
    return "\n".join(lines)


def format_methods(runs: list[dict]) -> str:
    """One row per run: the per-step seconds of each stage and the computed 50-step figures."""
    clocks = {r["clock"] for r in runs}
    head = [f"methods compared ({', '.join(sorted(clocks))} clock; s per DDIM step measured, {PAPER_STEPS}-step "
            f"figures computed from them):", "",
            "| config, image | method | DDIM inversion | method's pass | reconstruction | prompt-to-prompt edit "
            f"| SDEdit | inversion, {PAPER_STEPS} steps (computed) | edit, {PAPER_STEPS} steps (computed) "
            "| peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        by = {row.get("key", ""): row for row in r["rows"]}
        e = r["estimate"]

        def ps(key):
            return fmt(by[key]["per_step"], 3) if key in by else "—"
        inv = fmt(e["inversion_no_early_stop_s"], 0)
        if r["method"] in ("null-text", "null-text global"):
            inv += f" ({PAPER_INNER} {'passes' if r['method'] == 'null-text global' else 'Adam steps'})"
        head.append(f"| {r['config']}, {r['size']}² | {r['method']} | {ps('inversion')} | {ps('method')} | "
                    f"{ps('reconstruction')} | {ps('edit')} | {ps('sdedit')} | {inv} | {fmt(e['edit_s'], 0)} | "
                    f"{fmt(r['peak_mib'], 0)} |")
    return "\n".join(head)


def parse_methods(values) -> list[str]:
    from pack import load_pack
    load_pack()
    from blended_diffusion.models.inversion import METHODS
    out = []
    for v in values or ["null-text"]:
        for m in v.split(","):
            m = m.strip()
            if m not in METHODS:
                raise SystemExit(f"--method {m!r}: use one of {', '.join(METHODS)} (repeat --method or give a "
                                 "comma list)")
            if m not in out:
                out.append(m)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--config", default="sd15", choices=tuple(CONFIGS))
    p.add_argument("--method", action="append", default=None,
                   help="inversion method(s), repeatable or a comma list: null-text, null-text global, "
                        "negative-prompt, direct (default: null-text)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels, a multiple of 8 (default: 256 on the CPU, 512 on CUDA, 1024 for "
                        "sdxl on CUDA; 64 tiny)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 5 on the CPU, 50 on CUDA)")
    p.add_argument("--inner-steps", type=int, default=10, help="at most this many Adam steps per DDIM step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", default=None, choices=("cpu", "wall"),
                   help="clock of the table: cpu (process CPU time; default on the CPU) or wall (default on CUDA)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--from-json", action="append", default=None,
                   help="print the tables of runs saved with --json (repeatable: several runs in one table; "
                        "runs nothing)")
    args = p.parse_args(argv)
    args.methods = parse_methods(args.method)
    cpu = args.device == "cpu"
    if args.size is None:
        args.size = 64 if args.config in ("tiny", "tinyxl") else 256 if cpu else \
            1024 if args.config == "sdxl" else 512
    if args.steps is None:
        args.steps = 5 if cpu else 50
    if args.clock is None:
        args.clock = "cpu" if cpu else "wall"
    if args.size < 16 or args.size % 8:
        p.error(f"--size {args.size}: give a multiple of 8, at least 16")
    if args.steps < 2 or args.inner_steps < 1:
        p.error("--steps must be at least 2 and --inner-steps at least 1")
    if args.clock == "cpu" and not cpu:
        p.error("--clock cpu measures host CPU time: use it with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def load_runs(paths) -> list[dict]:
    """The runs saved in these --json files (a file holds one run, or {"runs": [...]}), summarised again."""
    runs = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        for r in saved["runs"] if "runs" in saved else [saved]:
            runs.append(summarize(r["clock"], r))
    return runs


def main(argv=None) -> dict:
    """Runs the benchmark (or prints saved runs); returns the run (one method) or {"runs": [...]}."""
    args = parse_args(argv)
    if args.from_json:  # print saved runs again (with this version's summary)
        runs = load_runs(args.from_json)
        print("\n\n".join(format_table(r) for r in runs), flush=True)
    else:
        threads = torch.get_num_threads()
        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            runs = run(args)
        finally:
            torch.set_num_threads(threads)
    if len(runs) > 1:
        print("", format_methods(runs), sep="\n", flush=True)
    res = runs[0] if len(runs) == 1 else {"runs": runs}
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
