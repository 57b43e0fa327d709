"""One benchmark worker: loads the models once, then edits and measures jobs (one item, every asked method).

The same class runs in the command's own process (the local runner) and inside each Ray actor. The methods
are the pack's own code paths, as ``edit`` and ``fidelity`` run them: Blended Diffusion is ``models.edit``
(ranked by ``models.apps.rank`` when the batch has several results); NULL-text inversion, prompt-to-prompt
and SDEdit are the engine's runs (models/inversion.py) on a Stable Diffusion checkpoint loaded through ComfyUI by the
host adapter (host/sd.py: ``SDModel``, ``encode_text``, ``tokenized``, ``invert_image``), as ``fidelity`` and the
NULL-text nodes run them; one inversion per item serves all its SD methods.
Every result is rounded to 8 bits (what its PNG holds) and measured with models/metrics.py's PIE-Bench metrics.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import SD_METHODS, Job, error_text

log = logging.getLogger(__name__)
CRASH_EXIT = 86  # exit status of a worker killed by fault injection (runner.CRASH_ENV)


@dataclass
class Config:
    """Everything a worker needs: plain values (it is sent to Ray actors). Paths must exist where it runs."""
    methods: list[str]
    clip: str                       # CLIP for guidance (Blended Diffusion) and, unless metric_clip, the metrics
    ddpm: str | None = None
    metric_clip: str | None = None
    dino: str | None = None
    lpips_net: str = "squeeze"
    device: str = "auto"
    gpu_id: int = 0
    precision: str = "auto"
    clip_precision: str | None = None
    seed: int = 404
    blended: dict = field(default_factory=dict)  # timestep_respacing, skip_timesteps, ddim, aug_num, ...
    sd: dict = field(default_factory=dict)       # checkpoint, comfyui, steps, guidance, inner_steps, t0, ...

    def settings(self, method: str) -> dict:
        """The settings a row of ``method`` records (what its result depends on besides the item)."""
        common = {"lpips_net": self.lpips_net, "metric_clip": Path(self.metric_clip or self.clip).name,
                  "dino": Path(self.dino).name if self.dino else None}
        if method == "blended":
            return {**self.blended, "model": Path(self.ddpm).name if self.ddpm else None,
                    "clip": Path(self.clip).name, **common}
        keys = {"p2p": ("steps", "guidance", "inner_steps", "cross_replace_steps", "self_replace_steps"),
                "sdedit": ("steps", "guidance", "inner_steps", "t0"),
                "sdedit-plain": ("steps", "guidance", "inner_steps", "t0")}[method]
        return {**{k: self.sd[k] for k in keys}, "checkpoint": Path(self.sd["checkpoint"]).name, **common}


def to8(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] 0..1 → the 8-bit values a PNG of it holds, as floats in 0..1."""
    return x.detach().float().cpu().clamp(0, 1).mul(255).round().div(255)


def _mask(m: np.ndarray | None) -> torch.Tensor | None:
    return None if m is None else torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None]


class Worker:
    def __init__(self, config: Config):
        self.config = config
        self.loaded = False
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # --- models -------------------------------------------------------------------------------------------
    def load(self) -> "Worker":
        """Load every model the methods and metrics need (once)."""
        if self.loaded:
            return self
        from ...models import load_clip, load_ddpm, memory
        from ..common import import_comfyui, resolve_device, resolve_precision
        cfg = self.config
        self.device = resolve_device(cfg.device, cfg.gpu_id)
        precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and memory.wanted():
            memory.keep_freed_memory()  # as the command line does on the CPU (models/memory.py)
        self.ddpm = None
        if "blended" in cfg.methods:
            self.ddpm = load_ddpm(cfg.ddpm, respacing=cfg.blended["timestep_respacing"], precision=precision,
                                  device=self.device)
        clip_precision = resolve_precision(cfg.clip_precision or cfg.precision, self.device)
        self.clip = load_clip(cfg.clip, device=self.device, precision=clip_precision)
        if (cfg.metric_clip or cfg.clip) == cfg.clip and clip_precision == "fp32":
            self.metric_clip = self.clip
        else:  # the metrics always in fp32
            self.metric_clip = load_clip(cfg.metric_clip or cfg.clip, device=self.device, precision="fp32")
        self.dino = None
        if cfg.dino:
            from ...models.dino import load_dino
            self.dino = load_dino(cfg.dino, device=self.device)
        self.sd_models = None
        if any(m in SD_METHODS for m in cfg.methods):
            from ...host import sd as host_sd
            import_comfyui(cfg.sd.get("comfyui"), self.device)
            with torch.inference_mode():
                self.sd_models = host_sd.load_checkpoint(Path(cfg.sd["checkpoint"]))
        self.loaded = True
        return self

    # --- one job ------------------------------------------------------------------------------------------
    def run(self, job: Job) -> list[dict]:
        """Every method of the job: [{"row": dict, "image": uint8 [H, W, 3] or None}], in job.methods order.
        A failing method gives a row with its error; the other methods still run."""
        if job.crash:
            os._exit(CRASH_EXIT)  # fault injection: the process dies with the job in flight
        if job.error is not None:
            return [self._result(job, m, error=job.error) for m in job.methods]
        self.load()
        source = torch.from_numpy(np.ascontiguousarray(job.image)).permute(2, 0, 1)[None].float() / 255
        edit_mask, eval_mask = _mask(job.edit_mask), _mask(job.eval_mask)
        out = []
        if "blended" in job.methods:
            t = time.perf_counter()
            try:
                img = self._blended(job, source, edit_mask)
                out.append(self._measured(job, "blended", img, source, eval_mask, time.perf_counter() - t))
            except Exception as e:
                log.debug("item %s, blended", job.item.id, exc_info=True)
                out.append(self._result(job, "blended", error=error_text(e), seconds=time.perf_counter() - t))
        sd_methods = [m for m in job.methods if m in SD_METHODS]
        if sd_methods:
            out += self._sd(job, sd_methods, source, eval_mask)
        order = {m: i for i, m in enumerate(job.methods)}
        return sorted(out, key=lambda r: order[r["row"]["method"]])

    def _result(self, job: Job, method: str, *, error: str | None = None, metrics: dict | None = None,
                image: np.ndarray | None = None, seconds: float | None = None, **extra) -> dict:
        it = job.item
        row = {"id": it.id, "method": method, "edit_type": it.edit_type, "prompt": it.prompt,
               "source_prompt": it.source_prompt, "settings": self.config.settings(method),
               "seed": self.config.seed, "seconds": None if seconds is None else round(seconds, 4),
               **extra, "metrics": metrics, "error": error, "worker": self.name, "attempt": job.attempt + 1}
        return {"row": row, "image": image}

    def _measured(self, job: Job, method: str, result: torch.Tensor, source: torch.Tensor,
                  eval_mask: torch.Tensor | None, seconds: float, **extra) -> dict:
        from ...models.metrics import pie_bench
        img = to8(result[:1])
        t = time.perf_counter()
        metrics = pie_bench(img, to8(source), eval_mask, self.metric_clip, job.item.prompt, self.dino,
                            self.config.lpips_net)[0]
        pixels = (img[0].permute(1, 2, 0) * 255).round().byte().numpy()
        return self._result(job, method, metrics=metrics, image=pixels, seconds=seconds,
                            metric_seconds=round(time.perf_counter() - t, 4), **extra)

    def _blended(self, job: Job, source: torch.Tensor, edit_mask: torch.Tensor | None) -> torch.Tensor:
        from ...models import AugmentSettings, Guide, edit
        from ...models.apps import rank
        b, prompt = self.config.blended, job.item.prompt
        guide = Guide(clip=self.clip if prompt else None, prompt=prompt, clip_lambda=b["clip_guidance_lambda"],
                      range_lambda=b["range_lambda"], augment=AugmentSettings(num_views=b["aug_num"]),
                      fast=b.get("fast", False))
        out = edit(self.ddpm, source, edit_mask, guide, skip_timesteps=b["skip_timesteps"], seed=self.config.seed,
                   batch_size=b["batch_size"], ddim=b["ddim"], max_batch=b["batch_size"])
        if out.shape[0] > 1 and prompt:  # the best of the batch by the pack's CLIP ranking, as `edit` ranks
            order, _ = rank(self.clip, out, edit_mask, prompt)
            out = out[order[:1]]
        return out[:1]

    def _sd(self, job: Job, methods: list[str], source: torch.Tensor, eval_mask: torch.Tensor | None) -> list:
        """The SD methods of one item from one NULL-text inversion of its source (cropped, with its mask, to the
        VAE's multiple as ComfyUI's VAE crops)."""
        from ..common import vae_crop
        it = job.item
        if not it.source_prompt:
            msg = "NULL-text inversion needs a caption of the source image: give source_prompt"
            return [self._result(job, m, error=msg) for m in methods]
        out = []
        with torch.inference_mode():  # ComfyUI's own mode for its models, as `fidelity` runs them
            t = time.perf_counter()
            try:
                image, eval_mask = vae_crop(self.sd_models[2], source, eval_mask)
                inv = self._invert(image, it.source_prompt)
            except Exception as e:
                log.debug("item %s, inversion", it.id, exc_info=True)
                err = f"NULL-text inversion: {error_text(e)}"
                return [self._result(job, m, error=err, seconds=time.perf_counter() - t) for m in methods]
            inv_s = round(time.perf_counter() - t, 4)
            src = inv.source.movedim(-1, 1).float()
            for m in methods:
                t = time.perf_counter()
                try:
                    img = self._p2p(job, inv) if m == "p2p" else \
                        self._sdedit(inv, it.prompt, "inversion" if m == "sdedit" else "random noise")
                    out.append(self._measured(job, m, img.movedim(-1, 1).float(), src, eval_mask,
                                              time.perf_counter() - t, inversion_seconds=inv_s))
                except Exception as e:
                    log.debug("item %s, %s", it.id, m, exc_info=True)
                    out.append(self._result(job, m, error=error_text(e), seconds=time.perf_counter() - t,
                                            inversion_seconds=inv_s))
        return out

    def _invert(self, image: torch.Tensor, caption: str):
        """NULL-text inversion (per-step null embeddings) of ``image`` [1, 3, H, W] captioned ``caption``."""
        from ...host import sd as host_sd
        model, sd_clip, vae = self.sd_models
        s = self.config.sd
        sd = host_sd.SDModel(model, grad=s["inner_steps"] > 0)
        inv, _ = host_sd.invert_image(sd, sd_clip, vae, image.movedim(1, -1), caption.strip(), steps=s["steps"],
                                      guidance=s["guidance"], inner_steps=s["inner_steps"], global_null=False)
        return inv

    def _sdedit(self, inv, prompt: str, start: str) -> torch.Tensor:
        """SDEdit at strength t0 towards ``prompt`` from the inversion ("inversion") or from noise ("random
        noise", plain SDEdit); an IMAGE [1, H, W, 3]."""
        from ...host import sd as host_sd
        from ...models import inversion as ni
        model, sd_clip, vae = self.sd_models
        s = self.config.sd
        if start == "inversion":
            inv.check_guidance(s["guidance"])
        sd = host_sd.SDModel(model)
        cond = sd.condition(sd_clip, prompt.strip() or inv.prompt, inv.latents[0])
        z = ni.sdedit_run(sd, inv, cond, s["t0"], s["guidance"], start, self.config.seed)
        return sd.decode(vae, z)

    def _p2p(self, job: Job, inv) -> torch.Tensor:
        """Prompt-to-prompt as PIE-Bench runs it: word swap when both prompts have as many words, refinement
        otherwise; with a blended_word "src tgt", local blending on those words and the target word's
        attention ×2; cross/self-attention injection 0.4/0.6 (the defaults of the settings). The edit, an
        IMAGE [1, H, W, 3]."""
        from ...host import sd as host_sd
        from ...models import inversion as ni
        model, sd_clip, vae = self.sd_models
        it, s = job.item, self.config.sd
        target = it.prompt.strip()
        if not target:
            raise ValueError("prompt-to-prompt needs a target prompt (the caption with the change)")
        inv.check_guidance(s["guidance"])
        src_tp, tgt_tp = host_sd.tokenized(sd_clip, inv.prompt), host_sd.tokenized(sd_clip, target)
        mode = "replace" if len(src_tp.words) == len(tgt_tp.words) else "refine"
        words = it.blended_word.split()
        reweight = {}
        if len(words) >= 2:
            try:
                tgt_tp.positions(words[1])
                reweight = {w: 2.0 for w in ni.split_words(words[1])}
            except ValueError:
                pass
        blend = ni.split_words(" ".join(words[:2])) if len(words) >= 2 else []
        ctrl = ni.controller(inv, src_tp, tgt_tp, mode, cross_replace_steps=s["cross_replace_steps"],
                             self_replace_steps=s["self_replace_steps"], reweight=reweight, blend_words=blend)
        sd = host_sd.SDModel(model, ctrl)
        z = ni.edit(sd, inv, sd.condition(sd_clip, target, inv.latents[0]), ctrl, s["guidance"])
        return sd.decode(vae, z)[1:2]  # [reconstruction, edit]
