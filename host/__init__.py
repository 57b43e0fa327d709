"""The one host adapter, the only code that imports ComfyUI: model, input and output folders, device, memory,
progress with previews and interrupts here; the Stable Diffusion glue (ComfyUI's MODEL / CLIP / VAE) in
``host/sd.py``.

Inside ComfyUI (``folder_paths`` and ``comfy.model_management`` loaded) it uses the host's services;
standalone (tests, the command line, ``cli/runner.py``) it gives the same services without the host:
models in the ``ddpm/`` and ``clip_guidance/`` folders of ``models.weights.search_dirs``
(``$BLENDED_DIFFUSION_MODELS``, ComfyUI's models folder when the pack sits in ``custom_nodes``,
``~/.cache/blended_diffusion``), files written to ``$BLENDED_DIFFUSION_OUTPUT`` or ``./output``, CUDA if
available, a tqdm bar, and an interrupt flag set by ``request_interrupt()``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from ..models.weights import EXAMPLES_DIR
from ..models.weights import FOLDERS as KINDS
from ..models import weights as _weights
from ..models.weights import search_dirs
from ..render import to_pil

log = logging.getLogger(__name__)

EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}

class StandaloneInterrupted(Exception):
    """The run was cancelled (``request_interrupt()``); loaded models stay usable."""


def attach(comfyui: bool) -> None:
    """Use ComfyUI's services (``comfyui`` True: its folders, device, model management, progress and interrupt) or
    the standalone ones. Decided once, when the host is imported (below); a process that holds both kinds of
    callers (the test suite: in-process ComfyUI tests beside standalone ones) switches with this."""
    global IN_COMFYUI, Interrupted, _mm, _cu, _fp
    if comfyui:
        import comfy.model_management as _mm
        import comfy.utils as _cu
        import folder_paths as _fp
        Interrupted = _mm.InterruptProcessingException
    else:
        _mm = _cu = _fp = None
        Interrupted = StandaloneInterrupted
    IN_COMFYUI = comfyui


# ComfyUI's services once ComfyUI has loaded (its main.py imports both before any custom node). The host never
# starts ComfyUI itself: a process that could merely import it (the command line, which may load it later as a
# checkpoint loader) keeps the standalone services, and never runs ComfyUI's device set-up by importing the pack.
attach("folder_paths" in sys.modules and "comfy.model_management" in sys.modules)
_interrupt = threading.Event()


def register() -> None:
    """Add ``models/ddpm`` and ``models/clip_guidance`` to ComfyUI's model folders (extending any
    extra_model_paths.yaml entries) and copy the pack's example images into ComfyUI's input folder
    (never overwriting a file there). Does nothing standalone."""
    if not IN_COMFYUI:
        return
    for kind in KINDS:
        _fp.add_model_folder_path(kind, os.path.join(_fp.models_dir, kind))
        _fp.folder_names_and_paths[kind][1].update(EXTENSIONS)  # same set object: extended in place
    try:
        target = input_dir()
        for png in EXAMPLES_DIR.glob("*.png"):
            if not (target / png.name).exists():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, target / png.name)
    except OSError as e:
        log.warning("could not copy the Blended Diffusion example images to ComfyUI's input folder: %s", e)


def list_models(kind: str) -> list[str]:
    """File names (relative, '/'-separated) of the models of one kind, sorted."""
    if IN_COMFYUI:
        return _fp.get_filename_list(kind)
    names = set()
    for root in search_dirs(kind):
        if root.is_dir():
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*")
                         if p.is_file() and p.suffix.lower() in EXTENSIONS)
    return sorted(names)


def model_path(kind: str, name: str) -> str:
    """Full path of a model file; FileNotFoundError names the folder to put it in."""
    if IN_COMFYUI:
        return _fp.get_full_path_or_raise(kind, name)
    dirs = search_dirs(kind)
    for root in dirs:
        if (root / name).is_file():
            return str(root / name)
    raise FileNotFoundError(f"{name!r} is not in {' or '.join(map(str, dirs))}: put the file there "
                            "(or point BLENDED_DIFFUSION_MODELS at a folder holding ddpm/ and clip_guidance/)")


def download_dir(kind: str) -> Path:
    """Where a missing official file of ``kind`` is downloaded: ComfyUI's first folder of that kind (models/ddpm,
    models/clip_guidance, or an extra_model_paths.yaml entry marked default); standalone the first lookup folder."""
    if IN_COMFYUI:
        return Path(_fp.get_folder_paths(kind)[0])
    return search_dirs(kind)[0]


def fetch_model(kind: str, name: str) -> str:
    """``model_path``, downloading an official file (models.weights.DEFAULT_WEIGHTS: 256x256_diffusion_uncond.pt,
    512x512_diffusion.pt, ViT-B-16.pt) that is missing, with the command line's download code (.part, resume,
    sha256) and its progress on the node (a bar standalone); Cancel stops it (the .part is resumed next time).
    ``$BLENDED_DIFFUSION_OFFLINE=1`` forbids the download: the error names the URL and the folder."""
    try:
        return model_path(kind, name)
    except FileNotFoundError:
        weight = _weights.official_file(kind, name)
        if weight is None:
            raise
    dest = download_dir(kind) / name
    if _weights.offline():
        raise _weights.WeightsError(
            f"{name} ({weight.description}) is missing and {_weights.ENV_OFFLINE} forbids downloads: download it "
            f"from {weight.url} and put it in {dest.parent}")
    log.info("%s is missing: downloading it from %s to %s", name, weight.url, dest)
    bar = Progress(1000, f"downloading {name}") if IN_COMFYUI else None
    shown = [-1]

    def report(got, total):
        if bar is not None and total:
            permille = int(1000 * got / total)
            if permille != shown[0]:  # at most 1000 updates to the frontend
                shown[0] = permille
                bar.update(permille)
        check_interrupt()

    try:
        path = _weights.download_file(weight.url, dest, weight=weight, progress=not IN_COMFYUI, report=report)
    finally:
        if bar is not None:
            bar.close()
    return str(path)


def output_dir() -> Path:
    """Where files the nodes write go: ComfyUI's output folder; standalone $BLENDED_DIFFUSION_OUTPUT or ./output."""
    if IN_COMFYUI:
        return Path(_fp.get_output_directory())
    return Path(os.environ.get("BLENDED_DIFFUSION_OUTPUT", "output"))


def input_dir() -> Path | None:
    """ComfyUI's input folder (also searched for files to read); None standalone."""
    return Path(_fp.get_input_directory()) if IN_COMFYUI else None


def torch_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_build_device() -> torch.device:
    """Where the loaders build models: ComfyUI's offload device (its model management moves them to the compute
    device when a node needs them, ``load_models``); standalone the compute device, as before."""
    if IN_COMFYUI:
        return _mm.unet_offload_device()
    return torch_device()


_PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def auto_precision(kind: str) -> str:
    """The compute precision ("fp32", "fp16", "bf16") the host would pick for a model of ``kind`` ("ddpm" or
    "clip_guidance") on its device: inside ComfyUI its own choice (``unet_dtype`` / ``text_encoder_dtype``, so
    --fp16-unet, --bf16-unet, --fp32-text-enc, --force-fp32, --cpu... apply); standalone fp16 on CUDA, else fp32."""
    if IN_COMFYUI:
        dev = _mm.get_torch_device()
        dtype = (_mm.unet_dtype(device=dev, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
                 if kind == "ddpm" else _mm.text_encoder_dtype(dev))
        return _PRECISION_NAMES.get(dtype, "fp32")  # fp8 weight types: compute in fp32
    return "fp16" if torch_device().type == "cuda" else "fp32"


def _patcher(module: torch.nn.Module):
    """The ComfyUI ModelPatcher of one of the pack's modules (a guided-diffusion UNet, a CLIP), made once and
    held by the module (ComfyUI's list of loaded models holds it only weakly, as it does for clip_vision)."""
    patcher = module.__dict__.get("bd_patcher")
    if patcher is None:
        import comfy.model_patcher
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=_mm.get_torch_device(),
                                                   offload_device=_mm.unet_offload_device())
        module.__dict__["bd_patcher"] = patcher
    return patcher


def load_models(*models) -> None:
    """Make the pack's models (``DDPM``, ``ClipModel``; None skipped) ready on one compute device before a node
    uses them. Inside ComfyUI: through its model management (``load_models_gpu``), so it loads them to its
    device, frees room by offloading other models first, lists them in ``current_loaded_models`` and offloads
    them on POST /free or under memory pressure; their schedules / cached embeddings follow the weights and
    inference tensors left by a move in inference mode are re-created (``thaw``). Standalone: every model moves
    to the first one's device (what the nodes always did)."""
    models = [m for m in models if m is not None]
    if not models:
        return
    if not IN_COMFYUI:
        device = models[0].device
        for m in models[1:]:
            if m.device != device:
                m.to(device)
        return
    patchers = [_patcher(m.model) for m in models]
    # full load: the pack's layers are plain torch modules, which ComfyUI's partial (lowvram) loading would leave
    # on the offload device
    _mm.load_models_gpu(patchers, force_full_load=True)
    with torch.inference_mode(False):
        for m, p in zip(models, patchers):
            if any(t.device != p.load_device for t in m.model.parameters()):  # --novram loads nothing
                m.model.to(p.load_device)
            m.to(p.load_device)  # the schedule / text cache follow the weights
            m.thaw()


def loaded(model) -> bool:
    """Whether ComfyUI's model management holds ``model`` (a DDPM or ClipModel) as loaded; always False standalone."""
    if not IN_COMFYUI:
        return False
    patcher = model.model.__dict__.get("bd_patcher")
    return patcher is not None and any(lm.model is patcher for lm in _mm.current_loaded_models)


def free_memory() -> None:
    """Give cached accelerator memory back (after unloading a model or an out-of-memory error)."""
    if IN_COMFYUI:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def on_out_of_memory(device) -> bool:
    """The engine's ``on_oom`` hook (models.edit): free what the host holds on ``device`` after an out-of-memory.
    Inside ComfyUI on an accelerator: its model management unloads its other models from the device (the pack's
    loaded ones are kept) and empties its cache; returns True when a model was unloaded (retrying the same batch
    may then fit). Standalone (or on the CPU): the CUDA cache is emptied; returns False."""
    device = torch.device(device)
    if IN_COMFYUI and device.type != "cpu":
        ours = [lm for lm in _mm.current_loaded_models
                if lm.model is not None and getattr(lm.model, "model", None) is not None
                and lm.model.model.__dict__.get("bd_patcher") is lm.model]
        unloaded = _mm.free_memory(float("inf"), device, keep_loaded=ours)
        _mm.soft_empty_cache()
        return bool(unloaded)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return False


def request_interrupt() -> None:
    """Ask the running sampler to stop at its next step (it raises ``Interrupted``)."""
    if IN_COMFYUI:
        _mm.interrupt_current_processing(True)
    else:
        _interrupt.set()


def check_interrupt() -> None:
    """Raise ``Interrupted`` if a stop was requested (the request is then cleared)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("cancelled")


class Progress:
    """``update(step, preview)``: step count out of ``total`` and an optional x̂0 preview ([B,3,H,W]
    in [-1, 1]); shown on the node in ComfyUI, as a tqdm bar standalone. Passing a different
    ``total`` starts a new stage (multi-stage runs such as extrapolation)."""

    def __init__(self, total: int, desc: str = "Blended Diffusion"):
        self.total = max(int(total), 1)
        self.step = 0
        if IN_COMFYUI:
            self._bar = _cu.ProgressBar(self.total)
        else:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, desc=desc, leave=False)

    def update(self, step: int, preview: torch.Tensor | None = None, total: int | None = None) -> None:
        step = int(step)
        if (total is not None and total != self.total) or step < self.step:  # a new stage
            self.total, self.step = max(int(total or self.total), 1), 0
            if not IN_COMFYUI:
                self._bar.reset(total=self.total)
        step = min(step, self.total)
        if IN_COMFYUI:
            self._bar.update_absolute(step, self.total,
                                      None if preview is None else ("JPEG", to_pil((preview[0] + 1) / 2), 512))
        else:
            self._bar.update(step - self.step)
        self.step = step

    def close(self) -> None:
        if not IN_COMFYUI:
            self._bar.close()


def progress(total: int, desc: str = "Blended Diffusion") -> Progress:
    return Progress(total, desc)
