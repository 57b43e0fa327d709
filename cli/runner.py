"""A small standalone executor for API-format workflows (no ComfyUI needed): what ``blended-diffusion run`` and the
tests run workflows with.

A workflow is ``{node_id: {"class_type": ..., "inputs": {name: value or [node_id, output_index]}}}``.
It runs the pack's nodes plus minimal stand-ins for the few core nodes our workflows use
(LoadImage, SaveImage, PreviewImage, ImageScale, ImagePadForOutpaint), under
``torch.inference_mode()`` as ComfyUI does. Inside ComfyUI the real core nodes run instead.

    result = run_workflow("workflows/api/text_edit.json", input_dir="example_images", output_dir="out")
    result.outputs["7"]    # the output tuple of node "7"
    result.files           # PNGs written by SaveImage / PreviewImage
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import imageio
from ..models.weights import EXAMPLES_DIR
from ..nodes import NODE_CLASS_MAPPINGS

log = logging.getLogger(__name__)


# --- stand-ins for core nodes (standalone runner only) -----------------------------------------------
class StandaloneLoadImage:
    """core LoadImage: IMAGE [1,H,W,3] and MASK = 1 − alpha (zeros 64x64 without alpha). The file is read
    by models/imageio.py: gray modes at their real depth (core clips 16-bit gray to white) and the first
    frame only, with a warning (core makes a batch of an animation's frames)."""
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    input_dir: Path = EXAMPLES_DIR

    def load_image(self, image, upload=None):
        name = image.rsplit(" [", 1)[0] if image.endswith("]") else image  # "x.png [input]"
        path = Path(self.input_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"LoadImage: {name!r} is not in {self.input_dir}")
        rgb, alpha = imageio.load_image(path)  # any mode at its real depth (core clips 16-bit gray)
        mask = torch.zeros(64, 64) if alpha is None else 1.0 - alpha
        return rgb.permute(0, 2, 3, 1), mask[None]


class StandaloneSaveImage:
    """core SaveImage / PreviewImage: PNGs ``<prefix>_<counter>.png`` in the output folder."""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    output_dir: Path = Path("output")
    files: list

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from PIL import Image
        out = Path(self.output_dir)
        (out / filename_prefix).parent.mkdir(parents=True, exist_ok=True)
        saved = []
        for img in images:
            arr = (img.float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            n = 1
            while (p := out / f"{filename_prefix}_{n:05d}_.png").exists():
                n += 1
            Image.fromarray(arr).save(p)
            saved.append(p)
        self.files.extend(saved)
        return {"ui": {"images": [{"filename": p.name, "subfolder": str(p.parent.relative_to(out)),
                                   "type": "output"} for p in saved]}, "result": ()}


class StandaloneImageScale:
    """core ImageScale (nearest-exact, bilinear, area, bicubic; lanczos falls back to bicubic here)."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    def upscale(self, image, upscale_method, width, height, crop="disabled"):
        if width == 0 and height == 0:
            return (image,)
        x = image.movedim(-1, 1)
        h, w = x.shape[-2:]
        width = width or max(1, round(w * height / h))
        height = height or max(1, round(h * width / w))
        if crop == "center":  # as comfy.utils.common_upscale
            old, new = w / h, width / height
            cx = round((w - w * (new / old)) / 2) if old > new else 0
            cy = round((h - h * (old / new)) / 2) if old < new else 0
            x = x[..., cy:h - cy, cx:w - cx]
        mode = upscale_method if upscale_method in ("nearest-exact", "bilinear", "area", "bicubic") else "bicubic"
        return (F.interpolate(x, size=(height, width), mode=mode).movedim(1, -1),)


class StandaloneImagePadForOutpaint:
    """core ImagePadForOutpaint: grey (0.5) padding, MASK 1 on the padding, feathered inside."""
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"

    def expand_image(self, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        new = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
        new[:, top:top + h, left:left + w] = image
        mask = torch.ones(h + top + bottom, w + left + right)
        t = torch.zeros(h, w)
        if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
            i = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
            j = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
            big_h, big_w = torch.full_like(i, h), torch.full_like(j, w)
            d = torch.stack([i if top else big_h, h - i if bottom else big_h,
                             j if left else big_w, w - j if right else big_w]).amin(0)
            v = (feathering - d) / feathering
            t = torch.where(d < feathering, v * v, t)
        mask[top:top + h, left:left + w] = t
        return new, mask[None]  # [1, H, W] as core returns it


CORE_STANDINS = {
    "LoadImage": StandaloneLoadImage,
    "SaveImage": StandaloneSaveImage,
    "PreviewImage": StandaloneSaveImage,
    "ImageScale": StandaloneImageScale,
    "ImagePadForOutpaint": StandaloneImagePadForOutpaint,
}


# --- the executor -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    outputs: dict = field(default_factory=dict)  # node id → tuple of outputs
    ui: dict = field(default_factory=dict)       # node id → the node's "ui" dict
    files: list = field(default_factory=list)    # files written by SaveImage / PreviewImage


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def load_workflow(workflow) -> dict:
    if isinstance(workflow, (str, os.PathLike)):
        workflow = json.loads(Path(workflow).read_text())
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise ValueError("not an API-format workflow ({id: {class_type, inputs}}); in ComfyUI use "
                         "'Export (API)' to save one (UI-format files have 'nodes' and 'links')")
    return {str(k): copy.deepcopy(v) for k, v in workflow.items()}  # overrides never touch the caller's dict


def run_workflow(workflow, input_dir=None, output_dir="output", overrides: dict | None = None) -> RunResult:
    """Execute every node of an API-format workflow (path or dict) once, dependencies first.

    ``input_dir``: where LoadImage looks (default: the pack's ``example_images/``); ``output_dir``: where
    SaveImage/PreviewImage write; ``overrides``: {node_id: {input: value}} applied before running."""
    wf = load_workflow(workflow)
    for nid, changes in (overrides or {}).items():
        if str(nid) not in wf:
            raise ValueError(f"override for node {nid!r}, which is not in the workflow (nodes: {', '.join(wf)})")
        wf[str(nid)].setdefault("inputs", {}).update(changes)
    classes = {**CORE_STANDINS, **NODE_CLASS_MAPPINGS}
    missing = sorted({n["class_type"] for n in wf.values()} - set(classes))
    if missing:
        raise ValueError(f"the standalone runner has no node {missing}; run this workflow in ComfyUI")
    result = RunResult()
    visiting: set[str] = set()

    def run(nid: str):
        if nid in result.outputs:
            return result.outputs[nid]
        if nid not in wf:
            raise ValueError(f"a link points to node {nid!r}, which is not in the workflow")
        if nid in visiting:
            raise ValueError(f"the workflow has a cycle through node {nid}")
        visiting.add(nid)
        node = wf[nid]
        kwargs = {}
        for name, v in node.get("inputs", {}).items():
            if _is_link(v):
                src = run(str(v[0]))
                if v[1] >= len(src):
                    raise ValueError(f"node {nid} input {name!r} links to output {v[1]} of node {v[0]}, "
                                     f"which has {len(src)} outputs")
                v = src[v[1]]
            kwargs[name] = v
        cls = classes[node["class_type"]]
        obj = cls()
        if cls is StandaloneLoadImage:
            obj.input_dir = Path(input_dir) if input_dir else EXAMPLES_DIR
        if cls is StandaloneSaveImage:
            obj.output_dir, obj.files = Path(output_dir), result.files
        try:
            out = getattr(obj, cls.FUNCTION)(**kwargs)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(f"in node {nid} ({node['class_type']})")
            raise
        if isinstance(out, dict):
            if "ui" in out:
                result.ui[nid] = out["ui"]
            out = out.get("result", ())
        result.outputs[nid] = tuple(out)
        visiting.discard(nid)
        return result.outputs[nid]

    with torch.inference_mode():
        for nid in wf:
            run(nid)
    return result

