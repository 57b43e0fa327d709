"""The example workflows: UI-format files (what the ComfyUI frontend opens) are well-formed and match the
nodes' INPUT_TYPES; their API-format twins agree with them; every API workflow runs end to end through
the standalone runner (cli/runner.py) on tiny checkpoints with step counts patched down, and its results
keep the background exactly where the blend says so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import make_thumbnails
import make_workflows as mw  # tests/ is on sys.path (conftest.py)
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS
from blended_diffusion.host import EXAMPLES_DIR
from blended_diffusion.cli.runner import run_workflow

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
EXAMPLES = EXAMPLES_DIR  # the pack's example images (what LoadImage finds)
CORE = mw.CORE_NODES  # INPUT_TYPES/RETURN_TYPES of the core nodes used (copied from ComfyUI's nodes.py)
VIRTUAL = {"Note", "MarkdownNote"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_COMBOS = {("LoadDDPM", "ckpt_name"), ("LoadCLIP", "clip_name"), ("LoadImage", "image"),
               ("CheckpointLoaderSimple", "ckpt_name")}


def _load(path):
    return json.loads(Path(path).read_text())


def _spec(node_type):
    if node_type in CORE:
        s = CORE[node_type]
        return s["input"], tuple(s["output"])
    cls = NODE_CLASS_MAPPINGS[node_type]
    return cls.INPUT_TYPES(), tuple(cls.RETURN_TYPES)


def _inputs(node_type):
    """[(name, type, options)] in INPUT_TYPES order, required then optional."""
    it, _ = _spec(node_type)
    out = []
    for section in ("required", "optional"):
        for name, s in it.get(section, {}).items():
            out.append((name, s[0], s[1] if len(s) > 1 and isinstance(s[1], dict) else {}))
    return out


def _widget(t, opts):
    return isinstance(t, (list, tuple)) or (t in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput"))


def _sockets(node_type):
    return [(n, t) for n, t, o in _inputs(node_type) if not _widget(t, o)]


def _expected_widgets(node_type):
    """[(input name or None for a UI-only value, type, options)] as the frontend lays out widgets_values."""
    out = []
    for name, t, o in _inputs(node_type):
        if not _widget(t, o):
            continue
        out.append((name, t, o))
        if o.get("control_after_generate") or (t == "INT" and name in ("seed", "noise_seed")):
            out.append((None, "CONTROL", {}))
    if node_type == "LoadImage":
        out.append((None, "UPLOAD", {}))
    return out


# the Blended Diffusion workflows (tests/make_workflows.py) run end to end here; other workflows in
# workflows/ (the NULL-text ones load Stable Diffusion with core CheckpointLoaderSimple, which the standalone
# runner has no stand-in for) get the static checks only
BD_API_FILES = [p for p in API_FILES if p.stem in {make().name for make in mw.WORKFLOWS}]


def _ids(paths):
    return [p.stem for p in paths]


# ------------------------------------------------------------------------------------------ the files
def test_every_application_has_both_formats():
    assert len(BD_API_FILES) == len(mw.WORKFLOWS) >= 9
    assert _ids(UI_FILES) == _ids(API_FILES), "each workflows/X.json needs workflows/api/X.json and back"


# ComfyUI (app/custom_node_manager.py) lists <pack>/<folder>/*.json for each of these folder names and
# serves every existing folder under the same URL prefix /api/workflow_templates/<pack>/; the first
# registered folder answers every request (aiohttp static routes: a missing file there is a 404).
TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]


def test_template_browser_serves_the_workflows():
    """The images live in example_images/, a name ComfyUI does not take for a template folder."""
    first = next(f for f in TEMPLATE_FOLDERS if (ROOT / f).is_dir())
    assert sorted(p.name for p in (ROOT / first).glob("*.json")) == sorted(p.name for p in UI_FILES)


def test_generated_files_are_current():
    assert mw.main(["--check"]) == 0, "workflows/ differs from tests/make_workflows.py: run it and commit"


def test_template_thumbnails_are_current():
    """The template browser shows <name>.jpg beside each template (tests/make_thumbnails.py draws them)."""
    assert sorted(p.stem for p in (ROOT / "workflows").glob("*.jpg")) == sorted(p.stem for p in UI_FILES)
    assert make_thumbnails.main(["--check"]) == 0, "workflows/*.jpg are stale: run tests/make_thumbnails.py"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_structure_and_links(path):
    wf = _load(path)
    assert wf["version"] == 0.4 and isinstance(wf["config"], dict) and isinstance(wf["extra"], dict)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids must be unique"
    assert wf["last_node_id"] >= max(nodes)
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(nodes)))
    assert any(n["type"] == "Note" and n["widgets_values"][0].strip() for n in wf["nodes"]), "explain it in a Note"
    for n in wf["nodes"]:  # the fields the frontend's workflow schema (0.4) requires, with their types
        assert n["type"] in VIRTUAL or n["type"] in CORE or n["type"] in NODE_CLASS_MAPPINGS, n["type"]
        assert isinstance(n["id"], int) and n["mode"] == 0 and isinstance(n["flags"], dict)
        assert all(len(n[k]) == 2 and all(isinstance(v, (int, float)) for v in n[k]) for k in ("pos", "size"))
        assert isinstance(n["properties"], dict) and isinstance(n["widgets_values"], list)
        if n["type"] not in VIRTUAL:
            assert n["properties"]["Node name for S&R"] == n["type"]
    links = {lk[0]: lk for lk in wf["links"]}
    assert len(links) == len(wf["links"]) and wf["last_link_id"] >= max(links)
    for lid, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        _, outs = _spec(nodes[src]["type"])
        out_type = outs[src_slot]
        socket_name, in_type = _sockets(nodes[dst]["type"])[dst_slot]
        assert out_type == in_type or "*" in (out_type, in_type), \
            f"link {lid}: {nodes[src]['type']} output {src_slot} is {out_type}, {socket_name} wants {in_type}"
        assert ltype == out_type
        assert nodes[src]["outputs"][src_slot]["type"] == out_type
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot] == {"name": socket_name, "type": in_type, "link": lid}
        # executed before its consumer
        assert nodes[src]["order"] < nodes[dst]["order"]
    for n in wf["nodes"]:
        if n["type"] in VIRTUAL:
            continue
        it, outs = _spec(n["type"])
        assert [i["name"] for i in n["inputs"]] == [s for s, _ in _sockets(n["type"])]
        assert [o["type"] for o in n["outputs"]] == list(outs)
        for i in n["inputs"]:
            if i["link"] is not None:
                assert links[i["link"]][3] == n["id"]
            else:
                assert i["name"] not in it.get("required", {}), f"{n['type']}: required input {i['name']} unlinked"
        for slot, o in enumerate(n["outputs"]):
            for lid in o["links"] or []:
                assert links[lid][1] == n["id"] and links[lid][2] == slot


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_widget_values_match_input_types(path):
    for n in _load(path)["nodes"]:
        if n["type"] in VIRTUAL:
            assert len(n["widgets_values"]) == 1 and isinstance(n["widgets_values"][0], str)
            continue
        expected = _expected_widgets(n["type"])
        values = n.get("widgets_values", [])
        assert len(values) == len(expected), f"{n['type']}: {len(values)} widget values for {expected}"
        for (name, t, o), v in zip(expected, values):
            where = f"{path.name} node {n['id']} {n['type']}.{name}"
            if t == "CONTROL":
                assert v in CONTROL_VALUES, where
            elif t == "UPLOAD":
                assert v == "image", where
            elif isinstance(t, (list, tuple)):
                assert isinstance(v, str), where
                if (n["type"], name) not in FILE_COMBOS:
                    assert v in t, f"{where}: {v!r} is not one of {t}"
            elif t == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), where
                assert o.get("min", v) <= v <= o.get("max", v), where
            elif t == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool), where
                assert o.get("min", v) <= v <= o.get("max", v), where
            elif t == "STRING":
                assert isinstance(v, str), where
            elif t == "BOOLEAN":
                assert isinstance(v, bool), where
        if n["type"] == "LoadImage":
            assert (EXAMPLES / values[0]).is_file(), f"{values[0]} is not shipped in example_images/"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_layout_readable(path):
    """Nodes do not overlap; groups do not overlap each other; every working node sits in one group."""
    wf = _load(path)
    boxes = [(n["id"], n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not overlap(a[1:], b[1:]), f"nodes {a[0]} and {b[0]} overlap"
    groups = [(g["title"], g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in wf["groups"]]
    assert groups, "group the nodes"
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not overlap(a[1:], b[1:]), f"groups {a[0]!r} and {b[0]!r} overlap"
    for g in wf["groups"]:  # the title (24 px font, about 12 px a character) fits the frame
        assert isinstance(g["title"], str) and len(g["title"]) * 12 <= g["bounding"][2], g["title"]
        assert len(g["bounding"]) == 4 and all(isinstance(v, (int, float)) for v in g["bounding"])
    for box in boxes:
        inside = [g[0] for g in groups if g[1] <= box[1] and g[2] <= box[2] and box[3] <= g[3] and box[4] <= g[4]]
        note = next(n for n in wf["nodes"] if n["id"] == box[0])["type"] in VIRTUAL
        assert len(inside) == (0 if note else 1), f"node {box[0]} is in groups {inside}"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_and_api_twins_agree(path):
    ui, api = _load(path), _load(path.parent / "api" / path.name)
    nodes = {n["id"]: n for n in ui["nodes"] if n["type"] not in VIRTUAL}
    assert set(api) == {str(i) for i in nodes}
    for nid, n in nodes.items():
        a = api[str(nid)]
        assert a["class_type"] == n["type"]
        assert a["_meta"]["title"] == n.get("title", a["_meta"]["title"])
        want = {}
        for (name, _, _), v in zip(_expected_widgets(n["type"]), n["widgets_values"]):
            if name is not None:
                want[name] = v
        sockets = _sockets(n["type"])
        for lid, src, slot, dst, dst_slot, _ in ui["links"]:
            if dst == nid:
                want[sockets[dst_slot][0]] = [str(src), slot]
        assert a["inputs"] == want, f"node {nid} ({n['type']})"
        it, _ = _spec(n["type"])
        missing = set(it.get("required", {})) - set(a["inputs"])
        assert not missing, f"API node {nid} ({n['type']}) lacks required inputs {missing}"


def _api_nodes(name, class_type):
    return {k: v for k, v in _load(ROOT / "workflows" / "api" / f"{name}.json").items()
            if v["class_type"] == class_type}


def _api(name):
    return _load(ROOT / "workflows" / "api" / f"{name}.json")


def test_workflows_cover_the_applications():
    """The issue's list: (a)-(i), each recognisable by its wiring, plus the evaluation node."""
    wfs = {p.stem: _api(p.stem) for p in API_FILES}

    def of(wf, ct):
        return [n for n in wf.values() if n["class_type"] == ct]

    def src(wf, link):
        return wf[link[0]]

    def found(pred):
        return [name for name, wf in wfs.items() if pred(wf)]

    # (a) Alg. 2 with a batch ranked by CLIP
    assert found(lambda wf: any(n["inputs"]["batch_size"] > 1 and "blend" in n["inputs"] and any(
        r["inputs"]["images"][0] == k for r in of(wf, "RankByCLIP")) for k, n in wf.items()
        if n["class_type"] == "BlendedDiffusionSampler"))
    # (b) Alg. 3: DDIM sampler on a ddim respacing
    assert found(lambda wf: any(n["inputs"]["sampler"] == "DDIM" and src(wf, n["inputs"]["step"]) and
                                src(wf, src(wf, n["inputs"]["step"])["inputs"]["ddpm"])["inputs"]["respacing"]
                                .startswith("ddim") for n in of(wf, "BlendedDiffusionSampler")))
    # (c) removal: empty prompt, no CLIP
    assert found(lambda wf: of(wf, "CLIPGuidedStep") and all(
        s["inputs"]["prompt"] == "" and "clip" not in s["inputs"] for s in of(wf, "CLIPGuidedStep")))
    # (d) background replacement: inverted mask
    assert found(lambda wf: any(b["inputs"]["invert"] for b in of(wf, "MaskBlend")))
    # (e) scribble-guided edit with k = 60 %
    assert found(lambda wf: any(n["inputs"]["image"] == "bd_scene_scribble.png" for n in of(wf, "LoadImage"))
                 and any(n["inputs"]["skip_timesteps"] == 40 for n in of(wf, "NoiseImage")))
    # (f) extrapolation with two prompts
    assert found(lambda wf: any(sum(bool(e["inputs"][f"extend_{d}"] and e["inputs"][f"prompt_{d}"].strip())
                                    for d in ("left", "right", "up", "down")) >= 2 for e in of(wf, "Extrapolate")))
    # (g) Alg. 1 (no blend, mask, background loss) next to Alg. 2 on the same start state
    assert found(lambda wf: any(
        "blend" not in a["inputs"] and "mask" in a["inputs"] and
        src(wf, a["inputs"]["step"])["inputs"]["lpips_lambda"] > 0 and any(
            "blend" in b["inputs"] and b["inputs"]["noise"] == a["inputs"]["noise"]
            for b in of(wf, "BlendedDiffusionSampler")) for a in of(wf, "BlendedDiffusionSampler")))
    # (h) three chained edits: a sampler's (ranked) output is the next NoiseImage's image, 3 deep
    def chain_depth(wf):
        def depth(noise_id):
            img = wf[noise_id]["inputs"]["image"][0]
            seen = img
            while wf[seen]["class_type"] in ("RankByCLIP",):
                seen = wf[seen]["inputs"]["images"][0]
            if wf[seen]["class_type"] != "BlendedDiffusionSampler":
                return 1
            return 1 + depth(wf[seen]["inputs"]["noise"][0])
        return max((depth(k) for k, n in wf.items() if n["class_type"] == "NoiseImage"), default=0)
    assert found(lambda wf: chain_depth(wf) >= 3 and len({m["inputs"]["mask"][0] for m in of(wf, "MaskBlend")}) >= 3)
    # (i) outpainting: core ImagePadForOutpaint feeds NoiseImage (image) and MaskBlend (mask)
    assert found(lambda wf: any(src(wf, n["inputs"]["image"])["class_type"] == "ImagePadForOutpaint"
                                for n in of(wf, "NoiseImage")) and any(
        src(wf, b["inputs"]["mask"])["class_type"] == "ImagePadForOutpaint" for b in of(wf, "MaskBlend")))
    # and the evaluation node
    assert found(lambda wf: of(wf, "BlendedDiffusionEvaluate"))
    # default weight files everywhere
    for wf in wfs.values():
        assert all(n["inputs"]["ckpt_name"] == "256x256_diffusion_uncond.pt" for n in of(wf, "LoadDDPM"))
        assert all(n["inputs"]["clip_name"] == "ViT-B-16.pt" for n in of(wf, "LoadCLIP"))


def test_masks_come_from_alpha_channels():
    """A LoadImage whose MASK is used must load a file with an alpha channel (else ComfyUI's mask is empty)."""
    from PIL import Image
    for path in API_FILES:
        wf = _load(path)
        used = {tuple(v) for n in wf.values() for v in n["inputs"].values() if isinstance(v, list)}
        for k, n in wf.items():
            if n["class_type"] == "LoadImage" and (k, 1) in used:
                with Image.open(EXAMPLES / n["inputs"]["image"]) as im:
                    assert "A" in im.getbands(), f"{path.name}: {n['inputs']['image']} has no alpha"
                    assert im.getchannel("A").getextrema()[0] == 0, "the alpha marks no region"


# --------------------------------------------------------------------------------------- end to end
FULL_SIZE = {"01_text_edit_ranked"}  # run on the 256 px tiny model; the others on a 64 px one (16x cheaper)
ONE_STEP = FULL_SIZE | {"08_editing_session"}  # the costliest run 1 step per sampler, the others 2


@pytest.fixture(scope="module")
def tiny_models(ckpt_dir, tmp_path_factory):
    """Two models folders holding tiny checkpoints under the default file names: {"256": dir, "64": dir}.
    The 64 px one is an unconditional UNet of tests/tiny.py's 64 px layout (its size is read from the
    weights, so the workflows run unchanged at 64 px)."""
    import tiny
    dirs = {}
    for size in ("256", "64"):
        d = tmp_path_factory.mktemp(f"models{size}")
        (d / "ddpm").mkdir()
        (d / "clip_guidance").mkdir()
        if size == "256":
            shutil.copy(ckpt_dir / mw.DDPM_FILE, d / "ddpm" / mw.DDPM_FILE)
        else:
            cfg = {k: v for k, v in tiny.UNET_64_CLASSES.items() if k != "num_classes"}
            tiny.save_unet(d / "ddpm" / mw.DDPM_FILE, cfg)
        shutil.copy(ckpt_dir / mw.CLIP_FILE, d / "clip_guidance" / mw.CLIP_FILE)
        dirs[size] = d
    return dirs


def _batch(wf: dict, sampler_id: str) -> int:
    """The test's batch size: 2 where a RankByCLIP sorts the results, else 1."""
    ranked = any(n["class_type"] == "RankByCLIP" and n["inputs"]["images"][0] == sampler_id for n in wf.values())
    return min(wf[sampler_id]["inputs"]["batch_size"], 2 if ranked else 1)


def small(wf: dict, steps_run: int = 2) -> dict:
    """Overrides that make a workflow cheap: 10 steps of which ``steps_run`` run, batch 1 (2 where ranked),
    2 views; extrapolation on 5 steps (each stage runs 50-80 % of them) and a small growth."""
    over = {}
    extrapolates = any(n["class_type"] == "Extrapolate" for n in wf.values())
    for k, n in wf.items():
        i, ct, o = n["inputs"], n["class_type"], {}
        if ct == "LoadDDPM":
            steps = 5 if extrapolates else 10
            o["respacing"] = f"ddim{steps}" if str(i["respacing"]).startswith("ddim") else str(steps)
        elif ct == "NoiseImage":
            o.update(skip_timesteps=10 - steps_run, strength=0.0)
        elif ct == "BlendedDiffusionSampler":
            o["batch_size"] = _batch(wf, k)
        elif ct == "ExtendingAugment":
            o["num_views"] = 2
        elif ct == "Extrapolate":
            o.update(num_views=2, amount=0.1)
        if o:
            over[k] = o
    return over


def _linked(res, link):
    return res.outputs[link[0]][link[1]]


@pytest.mark.parametrize("path", BD_API_FILES, ids=_ids(BD_API_FILES))
def test_api_workflow_runs(path, tiny_models, tmp_path, monkeypatch):
    wf = _load(path)
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tiny_models["256" if path.stem in FULL_SIZE else "64"]))
    res = run_workflow(path, input_dir=EXAMPLES, output_dir=tmp_path,
                       overrides=small(wf, 1 if path.stem in ONE_STEP else 2))
    saves = [k for k, n in wf.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    assert saves and res.files, "the workflow saves nothing"
    assert all(f.is_file() and f.stat().st_size > 0 for f in res.files)
    assert all(k in res.ui for k in saves)
    for k, n in wf.items():
        if n["class_type"] != "BlendedDiffusionSampler":
            continue
        out = res.outputs[k][0]
        noise = wf[n["inputs"]["noise"][0]]
        src = _linked(res, noise["inputs"]["image"])
        bs = _batch(wf, k)
        assert out.shape == (src.shape[0] * bs, *src.shape[1:3], 3), f"sampler {k}"
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        if "blend" in n["inputs"]:
            # Algorithm 2/3: outside the (inverted/feathered) mask the source is kept exactly
            mask = res.outputs[n["inputs"]["blend"][0]][1]
            keep = (mask == 0)
            assert keep.any() and (~keep).any()
            for r in range(out.shape[0]):
                kb = keep[min(r // bs, keep.shape[0] - 1)]
                diff = (out[r] - src[r // bs]).abs()[kb]
                assert diff.max() < 1e-5, f"sampler {k} result {r} changed the kept background"
            inside = (out - src.repeat_interleave(bs, 0)).abs()[(mask > 0.5).expand(out.shape[0], -1, -1)]
            assert inside.max() > 1e-3, f"sampler {k} did not edit the masked region"
    for k, n in wf.items():
        ct = n["class_type"]
        if ct == "RankByCLIP":
            images, scores, report = res.outputs[k]
            top = n["inputs"]["top_k"]
            assert images.shape[0] == len(scores) == (top or _linked(res, n["inputs"]["images"]).shape[0])
            assert scores == sorted(scores) and report.count("CLIP distance") == len(scores)
        elif ct == "Extrapolate":
            img = _linked(res, n["inputs"]["image"])
            out = res.outputs[k][0]
            sides = sum(bool(n["inputs"][f"extend_{d}"]) for d in ("left", "right"))
            h, w = img.shape[1:3]
            work_w = round(w * out.shape[1] / h)
            assert out.shape[1] == _linked(res, n["inputs"]["ddpm"]).image_size  # canvas height = model size
            assert out.shape[2] >= work_w + sides * 0.1 * work_w - 1
        elif ct == "ImagePadForOutpaint":
            img, mask = res.outputs[k]
            assert img.shape[2] == _linked(res, n["inputs"]["image"]).shape[2] + n["inputs"]["right"] + \
                n["inputs"]["left"]
            assert mask.shape == img.shape[:3] and mask[..., -1].min() == 1
    evals = {n["_meta"]["title"]: json.loads(res.outputs[k][0]) for k, n in wf.items()
             if n["class_type"] == "BlendedDiffusionEvaluate"}
    for title, rows in evals.items():
        assert rows and all({"clip_distance", "lpips_bg", "max_abs_bg"} <= set(r) for r in rows), title
    if {"Evaluate Algorithm 1", "Evaluate Algorithm 2"} <= set(evals):
        alg1, alg2 = evals["Evaluate Algorithm 1"], evals["Evaluate Algorithm 2"]
        assert all(r["max_abs_bg"] < 1e-4 for r in alg2), "Algorithm 2 keeps the background exactly"
        assert all(r["max_abs_bg"] > 1e-3 for r in alg1), "Algorithm 1 changes its whole working crop"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_loaders_carry_the_frontends_model_metadata(path):
    """Issue 13: each LoadDDPM / LoadCLIP of a UI workflow has properties.models = [{name, url, directory}] (the
    fields frontend 1.27.10 reads for its missing-models dialog) naming its widget's file, that file's official
    URL from models/weights.py, and a model folder the pack registers with ComfyUI."""
    from blended_diffusion.models import weights as W
    official = {w.name: w for w in W.DEFAULT_WEIGHTS.values()}
    for n in _load(path)["nodes"]:
        if n["type"] not in mw.LOADER_FOLDERS:
            continue
        folder = mw.LOADER_FOLDERS[n["type"]][0]
        name = n["widgets_values"][0]
        assert name in official, f"{path.name}: {n['type']} uses {name}, which has no official URL"
        assert n["properties"]["models"] == [{"name": name, "url": official[name].url, "directory": folder}]
        assert folder in W.FOLDERS and official[name].folder == folder
        assert official[name].url.startswith("https://")


# ---------------------------------------------------------------------------------- SDXL workflows
SD_NAMES = [make().name for make in mw.SD_WORKFLOWS]
SD_USERS = {"NullTextInvert", "NullTextEdit", "NullTextSDEdit", "FidelityCurve", "CompareInversionMethods"}


def test_sdxl_workflows_are_generated_and_cover_the_issue():
    """Issue 14's SDXL workflows: invert -> prompt-to-prompt, invert -> SDEdit, the method comparison, all from
    tests/make_workflows.py."""
    assert SD_NAMES and all(n.startswith("nulltext_") and "sdxl" in n for n in SD_NAMES)
    assert set(SD_NAMES) <= {p.stem for p in API_FILES} and not set(SD_NAMES) & {m().name for m in mw.WORKFLOWS}
    nodes = [n for name in SD_NAMES for n in _api(name).values()]
    edits = [n["inputs"] for n in nodes if n["class_type"] == "NullTextEdit"]
    assert {e["mode"] for e in edits} == {"replace", "refine", "reweight"}
    assert any(e["mode"] == "replace" and e["blend_words"].strip() for e in edits), "a local blend"
    assert len({n["inputs"]["t0"] for n in nodes if n["class_type"] == "NullTextSDEdit"}) >= 2, "two strengths"
    assert any(n["class_type"] == "CompareInversionMethods" for n in nodes), "the method comparison"


@pytest.mark.parametrize("name", SD_NAMES)
def test_sdxl_workflow_wiring(name):
    """The SDXL workflows feed the NULL-text nodes what they need: MODEL/CLIP/VAE from one SDXL checkpoint, an
    image upscaled to an SDXL size, a known method; edits at the inversion's guidance (the node refuses another),
    prompts that fit their prompt-to-prompt mode, and a Note that names the weights file, where it goes and the
    size."""
    from blended_diffusion.models import inversion as ni
    wf = _api(name)
    loaders = [k for k, n in wf.items() if n["class_type"] == "CheckpointLoaderSimple"]
    assert len(loaders) == 1 and wf[loaders[0]]["inputs"]["ckpt_name"] == mw.SDXL_FILE
    users = {k: n for k, n in wf.items() if n["class_type"] in SD_USERS}
    assert users
    for k, n in users.items():
        for slot, socket in enumerate(("model", "clip", "vae")):
            assert n["inputs"][socket] == [loaders[0], slot], f"{name} node {k} {n['class_type']}.{socket}"
        if "image" in n["inputs"]:  # the image to invert: upscaled to about a megapixel, sides multiples of 64
            scale = wf[n["inputs"]["image"][0]]
            assert scale["class_type"] == "ImageScale", f"{name} node {k} inverts an image of the example's size"
            w, h = scale["inputs"]["width"], scale["inputs"]["height"]
            assert w % 64 == 0 and h % 64 == 0 and abs(w * h / 1024 ** 2 - 1) < 0.1, (w, h)
            assert wf[scale["inputs"]["image"][0]]["class_type"] == "LoadImage"
    inversions = {k: n["inputs"] for k, n in users.items() if n["class_type"] == "NullTextInvert"}
    for k, inv in inversions.items():
        assert inv["method"] in ni.METHODS and not inv["global_null"]
        assert inv["prompt"].strip() and "(" not in inv["prompt"], "a plain caption (no (word:weight) syntax)"
    for k, n in users.items():
        if n["class_type"] not in ("NullTextEdit", "NullTextSDEdit"):
            continue
        i = n["inputs"]
        inv = inversions[i["inversion"][0]]
        assert i["inversion"][1] == 0 and i["guidance"] == inv["guidance"], f"{name} node {k}: the inversion's guidance"
        src, tgt = ni.split_words(inv["prompt"]), ni.split_words(i["target_prompt"])
        if n["class_type"] == "NullTextSDEdit":
            assert 0 < i["t0"] <= 1 and i["start"] in ni.SDEDIT_STARTS and tgt != src
        elif i["mode"] == "replace":  # a word swap: as many words, some different
            assert len(tgt) == len(src) and tgt != src, f"{name} node {k}"
            assert set(ni.split_words(i["blend_words"])) <= set(src) | set(tgt)
        elif i["mode"] == "refine":  # words added: the caption's words in order inside the target's
            it = iter(tgt)
            assert len(tgt) > len(src) and all(w in it for w in src), f"{name} node {k}"
        else:  # reweight: words of the caption, scaled
            words = ni.split_words(i["reweight_words"])
            assert words and set(words) <= set(tgt or src) and i["reweight_factor"] != 1.0, f"{name} node {k}"
    for k, n in users.items():
        if n["class_type"] == "CompareInversionMethods":  # every method, at the settings of the other workflows
            from blended_diffusion.models import compare as cmp
            i = n["inputs"]
            assert sorted(cmp.parse_methods(i["methods"])) == sorted(ni.METHODS), f"{name} node {k}"
            assert (i["steps"], i["guidance"], i["inner_steps"]) == (50, 7.5, 10) and i["prompt"].strip()
            assert i["filename_prefix"].strip() and ".." not in i["filename_prefix"]
    if name.endswith("prompt_to_prompt"):  # the brief: Direct Inversion for prompt-to-prompt (exact source row)
        assert [inv["method"] for inv in inversions.values()] == ["direct"]
    ui = _load(ROOT / "workflows" / f"{name}.json")
    note = next(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
    assert f"models/checkpoints/{mw.SDXL_FILE}" in note and "1024" in note and "refiner" in note


def test_saved_inversion_names_are_unique():
    """Each workflow that saves an inversion writes its own file (nulltext_05 loads nulltext_01's, an SD1.5 one;
    an SDXL file there would be refused)."""
    saved = [n["inputs"]["filename"] for p in API_FILES for n in _load(p).values() if n["class_type"] == "SaveInversion"]
    assert len(saved) == len(set(saved)) >= 2, saved
