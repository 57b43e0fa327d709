"""Generate the example workflows: one Python description per workflow gives both the UI-format
JSON (``workflows/<name>.json``, what the ComfyUI frontend saves and opens) and its API-format twin
(``workflows/api/<name>.json``, what ``/prompt`` and ``cli/runner.py`` execute), so they never drift.

    /work/venv/bin/python tests/make_workflows.py          # rewrite workflows/ from this file
    /work/venv/bin/python tests/make_workflows.py --check  # exit 1 if the committed JSON differs

Widget values are given by input name and written in the order of the node's INPUT_TYPES (required,
then optional), with the frontend's extra ``control_after_generate`` value right after an INT input
named ``seed`` or ``noise_seed`` (the frontend adds that widget to such inputs). Layout is automatic:
a Note across the top, then groups as vertical bands of columns, nodes stacked within a column.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack import load_pack  # noqa: E402
UI_DIR = ROOT / "workflows"
API_DIR = UI_DIR / "api"

DDPM_FILE = "256x256_diffusion_uncond.pt"
CLIP_FILE = "ViT-B-16.pt"
LOADER_FOLDERS = {"LoadDDPM": ("ddpm", "ckpt_name"), "LoadCLIP": ("clip_guidance", "clip_name")}
SEED_CONTROL = "fixed"  # control_after_generate value saved after seed / noise_seed widgets
MAX_RESOLUTION = 16384

# Core ComfyUI nodes the workflows use, with the INPUT_TYPES/RETURN_TYPES of ComfyUI's nodes.py
# (LoadImage's "image" combo lists ComfyUI's input folder: any file name is accepted here).
CORE_NODES = {
    "LoadImage": {
        "input": {"required": {"image": ([], {"image_upload": True})}},
        "output": ("IMAGE", "MASK"), "output_name": ("IMAGE", "MASK"), "display": "Load Image",
    },
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": (), "output_name": (), "display": "Save Image",
    },
    "PreviewImage": {
        "input": {"required": {"images": ("IMAGE",)}},
        "output": (), "output_name": (), "display": "Preview Image",
    },
    "ImagePadForOutpaint": {
        "input": {"required": {
            "image": ("IMAGE",),
            "left": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "top": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "right": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "bottom": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }},
        "output": ("IMAGE", "MASK"), "output_name": ("IMAGE", "MASK"), "display": "Pad Image for Outpainting",
    },
    "CheckpointLoaderSimple": {  # the SDXL workflows (SD_WORKFLOWS) load Stable Diffusion with it
        "input": {"required": {"ckpt_name": ([],)}},
        "output": ("MODEL", "CLIP", "VAE"), "output_name": ("MODEL", "CLIP", "VAE"), "display": "Load Checkpoint",
    },
    "ImageScale": {
        "input": {"required": {
            "image": ("IMAGE",),
            "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (["disabled", "center"],),
        }},
        "output": ("IMAGE",), "output_name": ("IMAGE",), "display": "Upscale Image",
    },
}
# frontend-only nodes: saved in the UI format, never sent to the server (absent from API JSON)
VIRTUAL_NODES = {"Note"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# widget values that exist in the UI only (LoadImage's upload button), by node type
UI_ONLY_WIDGETS = {"LoadImage": [("upload", "image")]}


def node_spec(node_type: str) -> dict:
    """{"input": INPUT_TYPES, "output": RETURN_TYPES, "output_name": RETURN_NAMES, "display": ...}."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    pack = load_pack()
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    return {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
            "output_name": tuple(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "display": pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)}


def is_widget(spec: tuple) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(t, (list, tuple)):
        return True
    return t in WIDGET_TYPES and not opts.get("forceInput", False)


def has_seed_control(name: str, spec: tuple) -> bool:
    """The frontend adds a control_after_generate widget to INT inputs named seed / noise_seed
    (and to any input whose options ask for it)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def ordered_inputs(node_type: str) -> list[tuple[str, tuple, bool]]:
    """[(name, spec, required)] in INPUT_TYPES order, required first."""
    it = node_spec(node_type)["input"]
    out = [(n, s, True) for n, s in it.get("required", {}).items()]
    out += [(n, s, False) for n, s in it.get("optional", {}).items()]
    return out


# --------------------------------------------------------------------------------------- description
@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    links: dict            # input name -> (Node, output slot)
    col: int
    group: str | None
    title: str | None = None
    text: str = ""         # Note text
    size: tuple = (0, 0)
    pos: tuple = (0, 0)

    def out(self, slot: int = 0):
        return (self, slot)


@dataclass
class Workflow:
    name: str
    note: str
    nodes: list = field(default_factory=list)
    groups: list = field(default_factory=list)  # (title, color)

    def add(self, node_type, col, group=None, title=None, **inputs) -> Node:
        links = {k: v for k, v in inputs.items() if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], Node)}
        widgets = {k: v for k, v in inputs.items() if k not in links}
        n = Node(len(self.nodes) + 1, node_type, widgets, links, col, group, title)
        self.nodes.append(n)
        return n

    def group(self, title, color):
        self.groups.append((title, color))
        return title


# ------------------------------------------------------------------------------------------- layout
COL_GAP, ROW_GAP, GROUP_PAD, GROUP_TITLE = 70, 40, 20, 40
TOP = 60  # left/top margin


def estimate_size(n: Node) -> tuple[int, int]:
    if n.type == "Note":
        lines = sum(max(1, -(-len(line) // 95)) for line in n.text.split("\n"))
        return (760, 60 + 18 * lines)
    if n.type == "LoadImage":
        return (320, 330)
    if n.type in ("SaveImage", "PreviewImage"):
        return (320, 300)
    width = 340
    spec_in = ordered_inputs(n.type)
    sockets = sum(1 for _, s, _ in spec_in if not is_widget(s))
    outs = len(node_spec(n.type)["output"])
    h = 36 + 22 * max(sockets, outs)
    for name, s, _ in spec_in:
        if is_widget(s):
            opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
            h += 90 if opts.get("multiline") else 26
            if has_seed_control(name, s):
                h += 26
    return (width, h + 10)


def layout(wf: Workflow) -> None:
    """Notes across the top; below them columns left to right. Groups are stacked in their order: a
    group starts below everything placed so far in any of its columns, so groups sharing columns form
    rows and never overlap; neighbouring columns of different groups get extra room for the frames."""
    notes = [n for n in wf.nodes if n.type == "Note"]
    others = [n for n in wf.nodes if n.type != "Note"]
    for n in wf.nodes:
        n.size = estimate_size(n)
    y0, x = TOP, TOP
    for n in notes:  # notes side by side across the top
        n.pos = (x, TOP)
        x += n.size[0] + COL_GAP
        y0 = max(y0, TOP + n.size[1] + 60)
    cols = sorted({n.col for n in others})
    widths = {c: max(n.size[0] for n in others if n.col == c) for c in cols}
    groups_in = {c: {n.group for n in others if n.col == c} for c in cols}
    col_x, x = {}, TOP
    for c in cols:
        if c - 1 in col_x and not groups_in[c] & groups_in[c - 1]:
            x += 2 * GROUP_PAD
        col_x[c] = x
        x += widths[c] + COL_GAP
    bottom = {c: y0 for c in cols}  # lowest edge used so far per column (including group frames)
    order = [g for g, _ in wf.groups] + [None]
    for g in order:
        members = [n for n in others if n.group == g]
        if not members:
            continue
        gcols = sorted({n.col for n in members})
        top = max(bottom[c] for c in gcols)
        top += GROUP_TITLE + (2 * GROUP_PAD if top > y0 else 0)
        low = top
        for c in gcols:
            y = top
            for n in [n for n in members if n.col == c]:
                n.pos = (col_x[c], y)
                y += n.size[1] + ROW_GAP
            low = max(low, y - ROW_GAP)
        for c in gcols:
            bottom[c] = low + GROUP_PAD


def group_bounds(wf: Workflow, title: str) -> list[int]:
    members = [n for n in wf.nodes if n.group == title]
    x0 = min(n.pos[0] for n in members) - GROUP_PAD
    y0 = min(n.pos[1] for n in members) - GROUP_PAD - GROUP_TITLE
    x1 = max(n.pos[0] + n.size[0] for n in members) + GROUP_PAD
    y1 = max(n.pos[1] + n.size[1] for n in members) + GROUP_PAD
    return [x0, y0, x1 - x0, y1 - y0]


# -------------------------------------------------------------------------------------------- output
def widget_values(n: Node) -> list:
    if n.type == "Note":
        return [n.text]
    vals = []
    unknown = set(n.widgets) - {name for name, s, _ in ordered_inputs(n.type) if is_widget(s)}
    if unknown:
        raise ValueError(f"{n.type} has no widget {sorted(unknown)}")
    for name, s, required in ordered_inputs(n.type):
        if not is_widget(s):
            continue
        if name in n.links:
            raise ValueError(f"{n.type}.{name}: widgets converted to inputs are not used here")
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        if name in n.widgets:
            v = n.widgets[name]
        elif "default" in opts:
            v = opts["default"]
        elif isinstance(s[0], (list, tuple)) and s[0]:
            v = s[0][0]
        else:
            raise ValueError(f"{n.type}.{name}: give a value (no default)")
        vals.append(v)
        if has_seed_control(name, s):
            vals.append(SEED_CONTROL)
    for _, v in UI_ONLY_WIDGETS.get(n.type, []):
        vals.append(v)
    return vals


def api_inputs(n: Node) -> dict:
    inputs = {}
    vals = widget_values(n)
    i = 0
    for name, s, _ in ordered_inputs(n.type):
        if is_widget(s):
            inputs[name] = vals[i]
            i += 2 if has_seed_control(name, s) else 1
        elif name in n.links:
            src, slot = n.links[name]
            inputs[name] = [str(src.id), slot]
    return inputs


def topo_order(wf: Workflow) -> dict[int, int]:
    order, done = {}, set()

    def visit(n):
        if n.id in done:
            return
        for src, _ in n.links.values():
            visit(src)
        done.add(n.id)
        order[n.id] = len(order)

    for n in sorted(wf.nodes, key=lambda n: (bool(n.links), n.id)):
        visit(n)
    return order


def to_ui(wf: Workflow) -> dict:
    layout(wf)
    order = topo_order(wf)
    links, link_id = [], 0
    in_links: dict[tuple[int, str], int] = {}
    out_links: dict[tuple[int, int], list] = {}
    for n in wf.nodes:
        if n.type in VIRTUAL_NODES:
            continue
        sockets = [name for name, s, _ in ordered_inputs(n.type) if not is_widget(s)]
        for name in sockets:
            if name not in n.links:
                continue
            src, slot = n.links[name]
            link_id += 1
            out_type = node_spec(src.type)["output"][slot]
            links.append([link_id, src.id, slot, n.id, sockets.index(name), out_type])
            in_links[(n.id, name)] = link_id
            out_links.setdefault((src.id, slot), []).append(link_id)
        missing = set(n.links) - set(sockets)
        if missing:
            raise ValueError(f"{n.type} has no input socket {sorted(missing)}")
    nodes = []
    for n in wf.nodes:
        d = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
             "order": order[n.id], "mode": 0}
        if n.type == "Note":
            d.update({"inputs": [], "outputs": [], "properties": {"text": ""}, "widgets_values": widget_values(n),
                      "color": "#432", "bgcolor": "#653"})
        else:
            spec = node_spec(n.type)
            d["inputs"] = [{"name": name, "type": s[0], "link": in_links.get((n.id, name))}
                           for name, s, _ in ordered_inputs(n.type) if not is_widget(s)]
            d["outputs"] = [{"name": spec["output_name"][i], "type": t,
                             "links": out_links.get((n.id, i), []), "slot_index": i}
                            for i, t in enumerate(spec["output"])]
            d["properties"] = {"Node name for S&R": n.type}
            if n.type in LOADER_FOLDERS:  # the frontend's missing-models dialog (properties.models)
                from blended_diffusion.models.weights import model_metadata
                kind, widget = LOADER_FOLDERS[n.type]
                models = model_metadata(kind, n.widgets[widget])
                if models:
                    d["properties"]["models"] = models
            d["widgets_values"] = widget_values(n)
        if n.title:
            d["title"] = n.title
        nodes.append(d)
    groups = [{"id": i + 1, "title": t, "bounding": group_bounds(wf, t), "color": c, "font_size": 24, "flags": {}}
              for i, (t, c) in enumerate(wf.groups)]
    return {"last_node_id": max(n.id for n in wf.nodes), "last_link_id": link_id, "nodes": nodes,
            "links": links, "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
            "version": 0.4}


def to_api(wf: Workflow) -> dict:
    out = {}
    for n in wf.nodes:
        if n.type in VIRTUAL_NODES:
            continue
        out[str(n.id)] = {"inputs": api_inputs(n), "class_type": n.type,
                          "_meta": {"title": n.title or node_spec(n.type)["display"]}}
    return out


# ----------------------------------------------------------------------------------------- workflows
load_pack()
from blended_diffusion.host import EXAMPLES_DIR  # noqa: E402

EXAMPLES_NAME = EXAMPLES_DIR.name  # folder of the example images in the pack
BLUE, GREEN, PURPLE, BROWN, GREY = "#3f789e", "#8A8", "#a1309b", "#b58b2a", "#444"
INPUT_NOTE = ("Example images: the pack copies its " + EXAMPLES_NAME + "/bd_*.png into ComfyUI/input when ComfyUI starts "
              "(if they are missing there, copy them by hand). Weights: models/ddpm/" + DDPM_FILE +
              " (guided-diffusion, 256x256 unconditional) and models/clip_guidance/" + CLIP_FILE +
              " (OpenAI CLIP ViT-B/16).")
MASK_NOTE = ("The mask comes from the image's alpha channel: LoadImage returns MASK = 1 where alpha = 0 "
             "(paint over another area in LoadImage's mask editor to edit it instead).")


def models(wf, col=0, group=None, respacing="100", clip=True):
    ddpm = wf.add("LoadDDPM", col, group, ckpt_name=DDPM_FILE, respacing=respacing, precision="fp32")
    c = wf.add("LoadCLIP", col, group, clip_name=CLIP_FILE, precision="fp32") if clip else None
    return ddpm, c


def note(wf, text):
    n = wf.add("Note", 0, None, title="About this workflow")
    n.text = text.strip() + "\n\n" + INPUT_NOTE
    return n


def wf_text_edit() -> Workflow:
    wf = Workflow("01_text_edit_ranked", "")
    note(wf, """
Text-driven local edit (Blended Diffusion, Algorithm 2) with a batch ranked by CLIP.
The red ball (masked by the image's alpha) becomes "a watermelon"; everything outside the mask is kept exactly.
NoiseImage noises the image to x_k (skip 25 of 100 steps: k = 75, the paper's setting); CLIPGuidedStep is the
CLIP-guided denoising step with extending augmentations; MaskBlend blends the noised background in at every step;
the sampler runs the loop for a batch of 4, and RankByCLIP sorts the results best first (CLIP distance of the
masked region to the prompt, shown on the node). Keep the prompts of CLIPGuidedStep and RankByCLIP the same.
""" + MASK_NOTE)
    g1, g2, g3 = wf.group("Inputs and models", BLUE), wf.group("Blended loop", GREEN), wf.group("Rank and save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_mask.png")
    ddpm, clip = models(wf, 0, g1)
    aug = wf.add("ExtendingAugment", 1, g2, image=img.out(0), num_views=8)
    noise = wf.add("NoiseImage", 1, g2, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=25, noise_seed=0)
    blend = wf.add("MaskBlend", 1, g2, mask=img.out(1), invert=False, feather=0, enforce_background=True)
    step = wf.add("CLIPGuidedStep", 2, g2, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0),
                  prompt="a watermelon")
    samp = wf.add("BlendedDiffusionSampler", 2, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDPM")
    rank = wf.add("RankByCLIP", 3, g3, images=samp.out(), clip=clip.out(), mask=blend.out(1),
                  prompt="a watermelon", top_k=0)
    wf.add("SaveImage", 3, g3, images=rank.out(0), filename_prefix="blended_diffusion/text_edit")
    wf.add("PreviewImage", 4, g3, title="Preview: x_k (start of the loop)", images=noise.out(1))
    wf.add("PreviewImage", 4, g3, title="Preview: augmented views CLIP sees", images=aug.out(1))
    return wf


def wf_ddim() -> Workflow:
    wf = Workflow("02_ddim_edit", "")
    note(wf, """
Algorithm 3: the blended loop with DDIM steps (eta 0, deterministic given x_k) instead of DDPM.
LoadDDPM uses the respacing "ddim50" (50 evenly spaced steps); skip 12 of 50 keeps k at about 75%.
The paper (fig. 29) finds DDPM better at 100 steps and DDIM better below 50 steps: change the respacing and
the sampler's DDPM/DDIM switch together to compare.
""" + MASK_NOTE)
    g1, g2, g3 = wf.group("Inputs and models", BLUE), wf.group("Blended loop (DDIM)", GREEN), wf.group("Save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_mask.png")
    ddpm, clip = models(wf, 0, g1, respacing="ddim50")
    aug = wf.add("ExtendingAugment", 1, g2, num_views=8)
    noise = wf.add("NoiseImage", 1, g2, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=12, noise_seed=0)
    blend = wf.add("MaskBlend", 1, g2, mask=img.out(1))
    step = wf.add("CLIPGuidedStep", 2, g2, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0), prompt="a rock")
    samp = wf.add("BlendedDiffusionSampler", 2, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDIM")
    wf.add("SaveImage", 3, g3, images=samp.out(), filename_prefix="blended_diffusion/ddim_edit")
    return wf


def wf_removal() -> Workflow:
    wf = Workflow("03_object_removal", "")
    note(wf, """
Object removal: the same blended loop with an EMPTY prompt, so there is no CLIP guidance (no CLIP model is
needed). The diffusion model fills the masked ball with content that fits its surroundings.
If traces of the object remain, lower skip_timesteps (more noise, the model forgets more of it) or
feather the mask a little.
""" + MASK_NOTE)
    g1, g2, g3 = wf.group("Inputs and model", BLUE), wf.group("Unguided blended loop", GREEN), wf.group("Save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_mask.png")
    ddpm, _ = models(wf, 0, g1, clip=False)
    noise = wf.add("NoiseImage", 1, g2, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=25, noise_seed=0)
    blend = wf.add("MaskBlend", 1, g2, mask=img.out(1), feather=0)
    step = wf.add("CLIPGuidedStep", 2, g2, ddpm=ddpm.out(), prompt="")
    samp = wf.add("BlendedDiffusionSampler", 2, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDPM")
    wf.add("SaveImage", 3, g3, images=samp.out(), filename_prefix="blended_diffusion/removal")
    return wf


def wf_background() -> Workflow:
    wf = Workflow("04_background_replacement", "")
    note(wf, """
Background replacement: MaskBlend's invert switch edits everything OUTSIDE the mask, so the ball is kept
exactly and the rest of the scene follows the prompt. skip 33 of 100 (k = 67, the paper's setting for
background edits). MaskBlend's mask output (the inverted mask) feeds RankByCLIP, which scores the new background.
""" + MASK_NOTE)
    g1, g2, g3 = wf.group("Inputs and models", BLUE), wf.group("Blended loop (inverted mask)", GREEN), \
        wf.group("Rank and save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_mask.png")
    ddpm, clip = models(wf, 0, g1)
    aug = wf.add("ExtendingAugment", 1, g2, num_views=8)
    noise = wf.add("NoiseImage", 1, g2, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=33, noise_seed=0)
    blend = wf.add("MaskBlend", 1, g2, mask=img.out(1), invert=True)
    prompt = "a snowy mountain landscape"
    step = wf.add("CLIPGuidedStep", 2, g2, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0), prompt=prompt)
    samp = wf.add("BlendedDiffusionSampler", 2, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDPM")
    rank = wf.add("RankByCLIP", 3, g3, images=samp.out(), clip=clip.out(), mask=blend.out(1), prompt=prompt)
    wf.add("SaveImage", 3, g3, images=rank.out(0), filename_prefix="blended_diffusion/background")
    return wf


def wf_scribble() -> Workflow:
    wf = Workflow("05_scribble_edit", "")
    note(wf, """
Scribble-guided edit (paper fig. 9 and supplement B.5.1): a crude tree is scribbled on the grass and the area
around it is masked (alpha). The noise hides the scribble's details but keeps its rough shape and colours, and
the guided loop turns it into "a pine tree". skip 40 of 100 (k = 60, as in the paper): more steps (lower skip)
give more realistic and varied results that keep less of the scribble; fewer steps keep the scribble almost as is.
To use your own: paint on an image, then in LoadImage's mask editor mask the scribbled area.
""")
    g1, g2, g3 = wf.group("Scribbled image and models", BLUE), wf.group("Blended loop (k = 60)", GREEN), \
        wf.group("Rank and save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_scribble.png")
    ddpm, clip = models(wf, 0, g1)
    aug = wf.add("ExtendingAugment", 1, g2, num_views=8)
    noise = wf.add("NoiseImage", 1, g2, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=40, noise_seed=0)
    blend = wf.add("MaskBlend", 1, g2, mask=img.out(1))
    prompt = "a pine tree"
    step = wf.add("CLIPGuidedStep", 2, g2, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0), prompt=prompt)
    samp = wf.add("BlendedDiffusionSampler", 2, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDPM")
    rank = wf.add("RankByCLIP", 3, g3, images=samp.out(), clip=clip.out(), mask=blend.out(1), prompt=prompt)
    wf.add("SaveImage", 3, g3, images=rank.out(0), filename_prefix="blended_diffusion/scribble")
    wf.add("PreviewImage", 4, g3, title="Preview: the noised scribble (x_k)", images=noise.out(1))
    return wf


def wf_extrapolate() -> Workflow:
    wf = Workflow("06_extrapolation", "")
    note(wf, """
Text-guided extrapolation with two prompts (paper fig. 10, supplement B.5.2): the image grows to the left
under one prompt and to the right under another. Extrapolate works at the model's size: it shifts a window a
quarter at a time, fills the new quarter by reflection and inpaints it with the blended loop under that side's
prompt, then evens out the new areas with a short unguided pass. amount = growth per side as a fraction of the
width (0.5: the result is twice as wide). The original pixels are kept (at working resolution).
""")
    g1, g2 = wf.group("Image and models", BLUE), wf.group("Extrapolate and save", GREEN)
    img = wf.add("LoadImage", 0, g1, image="bd_scene.png")
    ddpm, clip = models(wf, 0, g1)
    ext = wf.add("Extrapolate", 1, g2, image=img.out(0), ddpm=ddpm.out(), clip=clip.out(),
                 extend_left=True, prompt_left="a dense pine forest", extend_right=True,
                 prompt_right="a calm blue lake", extend_up=False, prompt_up="", extend_down=False, prompt_down="",
                 amount=0.5, seed=404, num_views=8, sampler="DDPM")
    wf.add("SaveImage", 2, g2, images=ext.out(), filename_prefix="blended_diffusion/extrapolation")
    return wf


def wf_alg1_vs_alg2() -> Workflow:
    wf = Workflow("07_alg1_vs_alg2", "")
    note(wf, """
Algorithm 1 next to Algorithm 2 on the same input, prompt, seed and start state x_k.
Algorithm 1 (local CLIP-guided diffusion): the sampler has NO blend; its mask input tells the CLIP loss where to
look and which region of the result replaces the input; the background is only encouraged by CLIPGuidedStep's
background losses (LPIPS 1000 and MSE 10000 outside the mask, the official code's weights). The diffusion
ignores the mask, so the edit may not fit it (paper fig. 3, 27).
Algorithm 2 (blended): MaskBlend mixes the noised source into the background at every step, so the edit is
coherent with the kept background, which is preserved exactly.
The Evaluate nodes report, per result, the CLIP distance to the prompt (lower = closer) and LPIPS and
max |difference| outside the mask versus the source (0 = background kept exactly).
Evaluate and the LPIPS background loss use the LPIPS VGG network: torchvision's vgg16-397923af.pth in the
torch hub cache ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints), downloaded on first use.
Offline: `blended-diffusion weights --lpips` fetches it (run it once online), or download
https://download.pytorch.org/models/vgg16-397923af.pth into that folder.
""" + MASK_NOTE)
    g1 = wf.group("Inputs and models", BLUE)
    g2 = wf.group("Algorithm 1: no blend, background loss", BROWN)
    g3 = wf.group("Algorithm 2: Blended Diffusion", GREEN)
    img = wf.add("LoadImage", 0, g1, image="bd_scene_mask.png")
    ddpm, clip = models(wf, 0, g1)
    aug = wf.add("ExtendingAugment", 1, g1, num_views=8)
    noise = wf.add("NoiseImage", 1, g1, image=img.out(0), ddpm=ddpm.out(), skip_timesteps=25, noise_seed=0)
    prompt = "a watermelon"
    step1 = wf.add("CLIPGuidedStep", 2, g2, title="CLIP-Guided Step (with background loss)", ddpm=ddpm.out(),
                   clip=clip.out(), augment=aug.out(0), prompt=prompt, lpips_lambda=1000.0, l2_lambda=10000.0)
    samp1 = wf.add("BlendedDiffusionSampler", 3, g2, title="Sampler: Algorithm 1 (no blend)", noise=noise.out(0),
                   step=step1.out(), mask=img.out(1), seed=404, batch_size=2, sampler="DDPM")
    wf.add("BlendedDiffusionEvaluate", 4, g2, title="Evaluate Algorithm 1", images=samp1.out(), source=img.out(0),
           mask=img.out(1), clip=clip.out(), prompt=prompt)
    wf.add("SaveImage", 5, g2, title="Save Algorithm 1", images=samp1.out(), filename_prefix="blended_diffusion/alg1")
    step2 = wf.add("CLIPGuidedStep", 2, g3, title="CLIP-Guided Step", ddpm=ddpm.out(), clip=clip.out(),
                   augment=aug.out(0), prompt=prompt)
    blend = wf.add("MaskBlend", 3, g3, mask=img.out(1))
    samp2 = wf.add("BlendedDiffusionSampler", 3, g3, title="Sampler: Algorithm 2 (blended)", noise=noise.out(0),
                   step=step2.out(), blend=blend.out(0), seed=404, batch_size=2, sampler="DDPM")
    wf.add("BlendedDiffusionEvaluate", 4, g3, title="Evaluate Algorithm 2", images=samp2.out(), source=img.out(0),
           mask=img.out(1), clip=clip.out(), prompt=prompt)
    wf.add("SaveImage", 5, g3, title="Save Algorithm 2", images=samp2.out(), filename_prefix="blended_diffusion/alg2")
    return wf


def wf_session() -> Workflow:
    wf = Workflow("08_editing_session", "")
    note(wf, """
An editing session of three chained edits (paper figs. 22-24): the best result of each edit (RankByCLIP, top_k 1)
is the input of the next NoiseImage, with a new mask and prompt each time.
1. Scribble-guided: the scribbled tree (bd_scene_scribble.png, its alpha is the mask) becomes "a pine tree" (k = 60).
2. Change an object: the ball's mask from bd_scene_mask.png is applied to result 1: "a watermelon".
3. Add an object: the sky mask from bd_scene_sky.png is applied to result 2: "a hot air balloon".
Edits 2 and 3 use only the MASK output of their LoadImage (its IMAGE is the original scene, not used).
In your own session, paint each new mask in LoadImage's mask editor, or save a result and load it again.
""")
    g0 = wf.group("Models", GREY)
    ddpm, clip = models(wf, 0, g0)
    aug = wf.add("ExtendingAugment", 0, g0, num_views=8)
    prev = None
    edits = [("Edit 1: scribble -> a pine tree", "bd_scene_scribble.png", "a pine tree", 40, BLUE),
             ("Edit 2: ball -> a watermelon", "bd_scene_mask.png", "a watermelon", 25, GREEN),
             ("Edit 3: sky + a hot air balloon", "bd_scene_sky.png", "a hot air balloon", 25, PURPLE)]
    for i, (title, image, prompt, skip, color) in enumerate(edits):
        g = wf.group(title, color)
        c = 1 + 3 * i
        img = wf.add("LoadImage", c, g, title=f"Load mask {i + 1}" if i else "Load scribbled image", image=image)
        blend = wf.add("MaskBlend", c, g, mask=img.out(1))
        source = img.out(0) if prev is None else prev.out(0)
        noise = wf.add("NoiseImage", c + 1, g, image=source, ddpm=ddpm.out(), skip_timesteps=skip, noise_seed=0)
        step = wf.add("CLIPGuidedStep", c + 1, g, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0), prompt=prompt)
        samp = wf.add("BlendedDiffusionSampler", c + 2, g, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                      seed=404 + i, batch_size=4, sampler="DDPM")
        rank = wf.add("RankByCLIP", c + 2, g, images=samp.out(), clip=clip.out(), mask=blend.out(1), prompt=prompt,
                      top_k=1)
        if i < len(edits) - 1:
            wf.add("PreviewImage", c + 2, g, title=f"Preview: after edit {i + 1}", images=rank.out(0))
        else:
            wf.add("SaveImage", c + 2, g, images=rank.out(0), filename_prefix="blended_diffusion/session")
        prev = rank
    return wf


def wf_outpaint() -> Workflow:
    wf = Workflow("09_outpainting", "")
    note(wf, """
Outpainting with core nodes: ComfyUI's "Pad Image for Outpainting" adds 192 grey pixels on the right and returns
a mask that is 1 on the new area and fades (feathering) into the original, so the new area blends in.
Its IMAGE feeds NoiseImage and its MASK feeds MaskBlend. skip_timesteps is 0: the padding is grey, so the new
area must be generated from pure noise (k = 100). The blended loop keeps the original pixels and paints the new
area under the prompt; a batch of 4 is ranked by CLIP on the new area.
""")
    g1, g2, g3 = wf.group("Image, padding and models", BLUE), wf.group("Blended loop", GREEN), \
        wf.group("Rank and save", PURPLE)
    img = wf.add("LoadImage", 0, g1, image="bd_scene.png")
    ddpm, clip = models(wf, 0, g1)
    pad = wf.add("ImagePadForOutpaint", 1, g1, image=img.out(0), left=0, top=0, right=192, bottom=0, feathering=24)
    aug = wf.add("ExtendingAugment", 2, g2, num_views=8)
    noise = wf.add("NoiseImage", 2, g2, image=pad.out(0), ddpm=ddpm.out(), skip_timesteps=0, noise_seed=0)
    blend = wf.add("MaskBlend", 2, g2, mask=pad.out(1))
    prompt = "green hills under a blue sky"
    step = wf.add("CLIPGuidedStep", 3, g2, ddpm=ddpm.out(), clip=clip.out(), augment=aug.out(0), prompt=prompt)
    samp = wf.add("BlendedDiffusionSampler", 3, g2, noise=noise.out(0), step=step.out(), blend=blend.out(0),
                  seed=404, batch_size=4, sampler="DDPM")
    rank = wf.add("RankByCLIP", 4, g3, images=samp.out(), clip=clip.out(), mask=blend.out(1), prompt=prompt)
    wf.add("SaveImage", 4, g3, images=rank.out(0), filename_prefix="blended_diffusion/outpaint")
    return wf


WORKFLOWS = [wf_text_edit, wf_ddim, wf_removal, wf_background, wf_scribble, wf_extrapolate, wf_alg1_vs_alg2,
             wf_session, wf_outpaint]


# --------------------------------------------------------------------------- Stable Diffusion (SDXL) workflows
# NULL-text inversion and its edits on an SDXL checkpoint loaded by core CheckpointLoaderSimple. nulltext_01…05
# (SD1.5) are static files; these are generated. The standalone runner has no stand-in for CheckpointLoaderSimple,
# so tests/test_workflows.py checks them statically and tests/test_comfyui_server.py runs them in ComfyUI.
SDXL_FILE = "sd_xl_base_1.0.safetensors"
SDXL_SIZE = (1152, 896)  # width, height: one of SDXL's training sizes (about 1024² pixels), near the example's 4:3
SD_CAPTION = "a red ball next to a small house on a green meadow"
SD_INPUT_NOTE = (
    "Weights: models/checkpoints/" + SDXL_FILE + " (Stable Diffusion XL base 1.0, from "
    "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0; any SDXL base checkpoint works, and so do "
    "SD1.x and SD2.x (eps and v-prediction) ones at their own sizes; the SDXL refiner, SD3 and Flux are refused). "
    "SDXL is made for about 1024x1024 pixels (1024², or the same area at another aspect ratio); much smaller "
    "images come out worse. Upscale Image brings the example (" + EXAMPLES_NAME + "/bd_scene.png, 512x384, copied into "
    "ComfyUI/input when ComfyUI starts) to %dx%d, one of SDXL's training sizes, cropping a few pixels at the sides; "
    "for your own image pick 1024x1024 or another size of about a megapixel (multiples of 64)." % SDXL_SIZE)
METHODS_NOTE = (
    "Methods (NullTextInvert's `method`), in one line: direct = exact reconstruction without optimisation, for edits "
    "whose unedited parts must stay; negative-prompt = the fastest, some drift; null-text = the paper's, optimised "
    "per step, several times the UNet calls (README's SDXL figures for a 50-step inversion at 256² on a 2-core CPU, "
    "computed from measured steps: null-text about 2.3 h, direct about 14 min, negative-prompt about 10; a GPU is "
    "far faster); see README, \"Inversion methods: when to pick which\". SDXL at 1024² fits a 16 GB GPU with "
    "every method (computed).")


def sd_note(wf, text):
    n = wf.add("Note", 0, None, title="About this workflow")
    n.text = text.strip() + "\n\n" + METHODS_NOTE + "\n" + SD_INPUT_NOTE
    return n


def sdxl_inputs(wf, group):
    """LoadImage → Upscale Image (SDXL size) and the SDXL checkpoint: (image node, checkpoint node)."""
    img = wf.add("LoadImage", 0, group, image="bd_scene.png")
    scaled = wf.add("ImageScale", 0, group, title="Upscale to an SDXL size", image=img.out(0),
                    upscale_method="lanczos", width=SDXL_SIZE[0], height=SDXL_SIZE[1], crop="center")
    ckpt = wf.add("CheckpointLoaderSimple", 0, group, ckpt_name=SDXL_FILE)
    return scaled, ckpt


def sd_models(ckpt):
    return dict(model=ckpt.out(0), clip=ckpt.out(1), vae=ckpt.out(2))


def wf_sdxl_p2p() -> Workflow:
    wf = Workflow("nulltext_06_sdxl_prompt_to_prompt", "")
    sd_note(wf, """
Prompt-to-prompt editing of a real image with SDXL, after Direct Inversion (Ju et al., "PnP Inversion"): DDIM
inversion of the image with its caption, then at every step the correction that puts the source branch back onto
the inversion trajectory. Nothing is optimised and the reconstruction is exact, so each edit's first image (the
source row) is the image itself. Save Inversion writes output/nulltext/bd_scene_sdxl.safetensors (an SDXL
inversion, format 3: edit it later with Load Inversion and the same checkpoint; another model is refused).
Each edit node samples the caption and the target prompt together and injects the caption's attention maps into
the edit; its output is [reconstruction, edit]:
- replace (word swap): "ball" -> "apple", with local blending on "ball apple" (outside those words' attention the
  result keeps the source);
- refine (added words): "wooden" is added before "house";
- reweight: the caption itself with "meadow" weighted x2.
On SDXL both text encoders (CLIP-L and CLIP-G) are patched: the prompts' words must sit at the same token
positions in both, which the node checks. Keep the guidance of the edits that of the inversion (7.5).
Costs, in UNet calls (N = 50 steps): the inversion N (batch 1) + N guided steps (batch 2), which also give the
reconstruction; each edit one N-step sampling of [source, edit] with guidance (batch 4). ComfyUI caches node outputs: a new edit prompt re-runs only that edit.
""")
    g1, g2, g3 = wf.group("Image and SDXL checkpoint", BLUE), wf.group("Direct Inversion", GREEN), \
        wf.group("Prompt-to-prompt edits", PURPLE)
    img, ckpt = sdxl_inputs(wf, g1)
    inv = wf.add("NullTextInvert", 1, g2, **sd_models(ckpt), image=img.out(), prompt=SD_CAPTION, steps=50,
                 guidance=7.5, inner_steps=10, global_null=False, method="direct")
    wf.add("SaveInversion", 1, g2, inversion=inv.out(0), filename="nulltext/bd_scene_sdxl")
    wf.add("SaveImage", 1, g2, title="Save the reconstruction", images=inv.out(1),
           filename_prefix="nulltext/sdxl_reconstruction")
    edits = [("Edit: ball -> apple (local blend)", "replace", SD_CAPTION.replace("ball", "apple"), {},
              "ball apple", "replace"),
             ("Edit: + wooden house (refine)", "refine", SD_CAPTION.replace("small house", "small wooden house"),
              {}, "", "refine"),
             ("Edit: meadow x2 (reweight)", "reweight", "", dict(reweight_words="meadow", reweight_factor=2.0),
              "", "reweight")]
    for i, (title, mode, target, extra, blend, prefix) in enumerate(edits):
        e = wf.add("NullTextEdit", 2 + i, g3, title=title, **sd_models(ckpt), inversion=inv.out(0),
                   target_prompt=target, mode=mode, cross_replace_steps=0.8, self_replace_steps=0.4, guidance=7.5,
                   blend_words=blend, word_replace_steps="", **extra)
        wf.add("SaveImage", 2 + i, g3, images=e.out(), filename_prefix=f"nulltext/sdxl_p2p_{prefix}")
    return wf


def wf_sdxl_sdedit() -> Workflow:
    wf = Workflow("nulltext_07_sdxl_sdedit", "")
    sd_note(wf, """
SDEdit of a real image with SDXL after Negative-Prompt Inversion (Miyake et al.): DDIM inversion with the
caption, and the caption's own embedding as the null embedding, so nothing is optimised (the cheapest method; its
reconstruction, previewed here, drifts a little from the image). SDEdit then re-runs the last t0 of the 50 DDIM
steps from the inverted latent towards the target prompt, at two strengths:
- t0 = 0.5: the last half of the steps, a milder edit that keeps more of the source;
- t0 = 0.8: a stronger edit that keeps less of it.
With this method the guidance acts through the target prompt's difference from the caption. For a source kept
exactly where the prompt does not change it, switch the method to direct; start = random noise on the SDEdit
nodes gives plain SDEdit (a noised source) for comparison.
Costs, in UNet calls (N = 50 steps): the inversion N + N (its reconstruction); each SDEdit t0·N guided steps
(batch 2). NPI's authors report about 5 s per 50-step inversion at 512 px on a GPU and more than 30 times
faster than NULL-text at comparable fidelity (not measured here).
""")
    g1, g2, g3 = wf.group("Image and SDXL checkpoint", BLUE), wf.group("Negative-Prompt Inversion", GREEN), \
        wf.group("SDEdit at two strengths", PURPLE)
    img, ckpt = sdxl_inputs(wf, g1)
    inv = wf.add("NullTextInvert", 1, g2, **sd_models(ckpt), image=img.out(), prompt=SD_CAPTION, steps=50,
                 guidance=7.5, inner_steps=10, global_null=False, method="negative-prompt")
    wf.add("PreviewImage", 1, g2, title="Preview: the reconstruction", images=inv.out(1))
    target = "a watercolor painting of " + SD_CAPTION
    for i, t0 in enumerate((0.5, 0.8)):
        e = wf.add("NullTextSDEdit", 2 + i, g3, title=f"SDEdit t0 = {t0}", **sd_models(ckpt), inversion=inv.out(0),
                   target_prompt=target, t0=t0, start="inversion", seed=0, guidance=7.5)
        wf.add("SaveImage", 2 + i, g3, images=e.out(), filename_prefix=f"nulltext/sdxl_sdedit_{int(t0 * 10):02d}")
    return wf


def wf_sdxl_compare() -> Workflow:
    wf = Workflow("nulltext_08_sdxl_compare_methods", "")
    sd_note(wf, """
Every inversion method on one image with SDXL: Compare Inversion Methods inverts the image with the caption by
null-text, null-text global, negative-prompt and direct in turn (50 steps, guidance 7.5, 10 Adam steps for the
NULL-text ones) and rebuilds it from each inversion. Its table (previewed here) has one row per method with
the reconstruction's LPIPS and PSNR to the source, its PSNR to the VAE round trip, the latent error, the seconds
and the UNet calls; the first row, "vae", is the VAE's own encode -> decode, the ceiling no method can beat (best
values in green). The CSV output (shown on the node) holds the same numbers; both are also written to
output/nulltext/sdxl_compare_NNNNN.png / .csv. The reconstructions output is the source, the VAE round trip,
then each method's reconstruction, in table order.
Costs: the sum of the four inversions. In README's measurement (20 steps on the tiny test network) the UNet
calls were null-text 226, null-text global 640, negative-prompt 40, direct 40: the NULL-text methods are most
of the run; list fewer methods (e.g. "negative-prompt, direct") for a quick look.
LPIPS uses torchvision's VGG weights vgg16-397923af.pth in the torch hub cache ($TORCH_HOME/hub/checkpoints),
downloaded on first use; offline: `blended-diffusion weights --lpips` fetches it (run it once online).
""")
    g1, g2, g3 = wf.group("Image and SDXL checkpoint", BLUE), wf.group("Compare the methods", GREEN), \
        wf.group("Table and reconstructions", PURPLE)
    img, ckpt = sdxl_inputs(wf, g1)
    cmp = wf.add("CompareInversionMethods", 1, g2, **sd_models(ckpt), image=img.out(), prompt=SD_CAPTION,
                 methods="null-text, null-text global, negative-prompt, direct", steps=50, guidance=7.5,
                 inner_steps=10, filename_prefix="nulltext/sdxl_compare")
    wf.add("PreviewImage", 2, g3, title="Preview: the table", images=cmp.out(0))
    wf.add("SaveImage", 3, g3, title="Save the reconstructions", images=cmp.out(2),
           filename_prefix="nulltext/sdxl_compare_reconstructions")
    return wf


SD_WORKFLOWS = [wf_sdxl_p2p, wf_sdxl_sdedit, wf_sdxl_compare]


def build() -> dict[str, tuple[dict, dict]]:
    """{name: (ui_json, api_json)} for every generated workflow (Blended Diffusion and SDXL)."""
    out = {}
    for make in WORKFLOWS + SD_WORKFLOWS:
        wf = make()
        out[wf.name] = (to_ui(wf), to_api(wf))
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for name, (ui, api) in build().items():
        for path, obj in ((UI_DIR / f"{name}.json", ui), (API_DIR / f"{name}.json", api)):
            text = dumps(obj)
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("out of date (run tests/make_workflows.py):", *map(str, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
