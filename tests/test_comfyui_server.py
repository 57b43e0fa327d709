"""The pack inside a real ComfyUI server (subprocess): registration, model folders, every API workflow
end to end through ``/prompt`` + ``/history``, progress with previews over the websocket, and Cancel.

Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout (a folder with ``main.py``). ``COMFYUI_PYTHON``
names the interpreter that runs it (default: this one); it needs ComfyUI's requirements and this pack's.
The pack and the tiny checkpoints are given to ComfyUI only through ``--extra-model-paths-config``; the
NULL-text workflows load a small random Stable Diffusion 1.5 checkpoint, and the SDXL ones (``nulltext_06``…) a
small random SDXL checkpoint (both tests/tiny_sd.py, written by ``COMFYUI_PYTHON`` since they are built with
ComfyUI's classes; the SDXL one, about 2.1 GB, only when a selected test runs an SDXL workflow, once per session)
through core ``CheckpointLoaderSimple``.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "main.py").is_file():
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the server tests", allow_module_level=True)

import tiny  # noqa: E402  (tests/ is on sys.path via conftest)

COMFY = Path(COMFY).resolve()
PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_blended_diffusion"
API_DIR = ROOT / "workflows" / "api"
WORKFLOWS = sorted(API_DIR.glob("*.json")) if API_DIR.is_dir() else []
NODE_IDS = ["LoadDDPM", "LoadCLIP", "NoiseImage", "CLIPGuidedStep", "MaskBlend", "ExtendingAugment",
            "RankByCLIP", "Extrapolate", "BlendedDiffusionSampler", "BlendedDiffusionEvaluate"]
DDPM_FILE, CLIP_FILE = "256x256_diffusion_uncond.pt", "ViT-B-16.pt"
SD_FILE = "tiny_sd15_random.safetensors"  # every CheckpointLoaderSimple of a workflow is pointed at it,
SDXL_FILE = "tiny_sdxl_random.safetensors"  # or at this one where the workflow loads an SDXL checkpoint
SDXL_WRITE_TIMEOUT = 300  # tests/tiny_sd.py --kind sdxl: 11-50 s measured on the shared 2-core machine
START_TIMEOUT = 150
PROMPT_TIMEOUT = 150
HOST = "127.0.0.1"
# a tiny 256 px UNet still costs seconds per step on a shared CPU: respacing "2" and skip 1 = one step
FAST = dict(respacing=2, skip=1, strength=0.5)
# workflows on the SD checkpoint: 4 DDIM steps, 2 Adam steps per step, two SDEdit strengths, one Blended
# Diffusion step; and 96x64 copies of their images (SD1's full-size VAE costs seconds per call at 512x384 on a
# CPU). 96x64 = 12x8 latents, whose lowest UNet level (3x2) is small enough for prompt-to-prompt's
# self-attention injection (layers of at most 1/16 of the latent's pixels). The SDXL workflows' Upscale Image
# (to an SDXL size) is set to the same small size; the tiny SDXL's lowest level is 3x2 there too.
SD_FAST = dict(steps=4, inner_steps=2, t0_values="0.5, 1.0", skip_timesteps="1")
SD_SIZE = (96, 64)  # width, height
PLOT_SIZE = (720, 520)  # FidelityCurve's plot


# --------------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, port, log_path, base, input_dir, output_dir, temp_dir):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.base, self.input_dir, self.output_dir, self.temp_dir = base, input_dir, output_dir, temp_dir
        self._object_info = None

    def url(self, path):
        return f"http://{HOST}:{self.port}{path}"

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, data, timeout=30):
        req = urllib.request.Request(self.url(path), data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body.strip() else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def log_tail(self, n=6000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"

    @property
    def object_info(self):
        if self._object_info is None:
            self._object_info = self.get("/object_info", timeout=60)
        return self._object_info


class WebSocket:
    """A minimal RFC 6455 client (stdlib only) for ComfyUI's /ws: text frames are JSON, binary frames are
    previews. The server never fragments messages."""

    def __init__(self, port, client_id):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("websocket closed by the server")
        self.buf += chunk

    def _frame(self):
        b = self.buf
        if len(b) < 2:
            return None
        opcode, n, pos = b[0] & 0x0F, b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, pos = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, pos = struct.unpack(">Q", b[2:10])[0], 10
        mask = None
        if b[1] & 0x80:
            mask, pos = b[pos:pos + 4], pos + 4
        if len(b) < pos + n:
            return None
        data = b[pos:pos + n]
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        self.buf = b[pos + n:]
        return opcode, data

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        head = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames only (< 126 bytes)
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def recv(self, timeout):
        """Next message: a dict (JSON) or bytes (binary); None after `timeout` seconds of silence."""
        deadline = time.monotonic() + timeout
        while True:
            fr = self._frame()
            if fr is not None:
                opcode, data = fr
                if opcode == 1:
                    return json.loads(data)
                if opcode == 2:
                    return data
                if opcode == 8:
                    raise ConnectionError("websocket closed by the server")
                if opcode == 9:
                    self._send(10, data)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                self._fill()
            except socket.timeout:
                return None

    def close(self):
        try:
            self._send(8)
        except OSError:
            pass
        self.sock.close()


def _input_specs(info):
    spec = info.get("input", {})
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _combo_options(spec):
    """Options of a combo input in either object_info format ([list, opts] or ["COMBO", {options}])."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options", [])
    return None


def _number(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def _set_steps(prompt, object_info, respacing, skip, strength, batch=1, views=2, seed_offset=0):
    """Patch widget values by input name so that a workflow runs on tiny checkpoints in a few steps."""
    for node in prompt.values():
        info = object_info.get(node.get("class_type"))
        if info is None:
            continue
        specs = _input_specs(info)
        for name, value in list(node.get("inputs", {}).items()):
            if isinstance(value, list):  # a link
                continue
            spec = specs.get(name)
            if spec is None:
                continue
            opts = _combo_options(spec)
            key = name.lower()
            if "respacing" in key:
                if opts is not None:
                    nums = sorted((o for o in opts if _number(o) is not None), key=_number)
                    pick = [o for o in nums if _number(o) <= respacing]
                    node["inputs"][name] = (pick[-1] if pick else nums[0]) if nums else value
                elif spec[0] == "INT":
                    node["inputs"][name] = respacing
                elif isinstance(value, str) and value.lower().startswith("ddim"):
                    node["inputs"][name] = f"ddim{respacing}"
                else:
                    node["inputs"][name] = str(respacing)
            elif key in ("skip_timesteps", "skip"):
                node["inputs"][name] = skip
            elif key == "strength" and isinstance(value, (int, float)) and value > 0:  # 0 = use skip
                node["inputs"][name] = strength
            elif key in ("batch_size", "batch"):
                node["inputs"][name] = batch
            elif key in ("num_views", "views", "n_views", "aug_num"):
                node["inputs"][name] = views
            elif key == "amount" and spec[0] == "FLOAT":  # Extrapolate: the least growth, one window
                node["inputs"][name] = spec[1].get("min", value) if len(spec) > 1 else value
            elif key in ("top_k", "topk", "k"):
                node["inputs"][name] = min(value, batch) if isinstance(value, int) else value
            elif key in ("seed", "noise_seed") and isinstance(value, int):
                node["inputs"][name] = value + seed_offset
    return prompt


def _unprovided_models(prompt, object_info):
    """Files that core (non-pack) loaders of `prompt` ask for and ComfyUI does not offer."""
    missing = []
    for node in prompt.values():
        info = object_info.get(node["class_type"], {})
        if PACK_NAME in str(info.get("python_module", "")) or node["class_type"] in (
                "LoadImage", "LoadImageMask"):
            continue
        for name, spec in _input_specs(info).items():
            value, opts = node["inputs"].get(name), _combo_options(spec)
            if isinstance(value, str) and opts is not None and value not in opts:
                missing.append(f"{node['class_type']}.{name}={value}")
    return missing


def _small_name(name):
    stem, _, ext = name.rpartition(".")
    return f"{stem}_{SD_SIZE[0]}x{SD_SIZE[1]}.{ext}"


def _uses_sd(prompt):
    return any(n["class_type"] == "CheckpointLoaderSimple" for n in prompt.values())


def _is_sdxl_name(name):
    """A checkpoint file name of the SDXL family (what the workflows name: sd_xl_base_1.0.safetensors, …)."""
    return isinstance(name, str) and ("sd_xl" in name.lower() or "sdxl" in name.lower())


def _use_tiny_sd(prompt):
    """Point a workflow that loads a Stable Diffusion checkpoint at the tiny one of its family (SDXL or SD1.5),
    at the small copies of its images (and Upscale Image at their size), and at SD_FAST's step counts."""
    if not _uses_sd(prompt):
        return prompt
    for node in prompt.values():
        inputs, ct = node["inputs"], node["class_type"]
        if ct == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = SDXL_FILE if _is_sdxl_name(inputs["ckpt_name"]) else SD_FILE
        elif ct in ("LoadImage", "LoadImageMask") and isinstance(inputs.get("image"), str):
            inputs["image"] = _small_name(_image_name(inputs["image"]))
        elif ct == "ImageScale":
            inputs.update(width=SD_SIZE[0], height=SD_SIZE[1])
        elif ct in ("NullTextInvert", "CompareInversionMethods"):
            inputs.update(steps=SD_FAST["steps"], inner_steps=SD_FAST["inner_steps"])
        elif ct == "FidelityCurve":
            inputs.update(t0_values=SD_FAST["t0_values"], skip_timesteps=SD_FAST["skip_timesteps"])
    return prompt


def _load_workflow(path):
    prompt = json.loads(path.read_text())
    if "prompt" in prompt and isinstance(prompt["prompt"], dict):
        prompt = prompt["prompt"]
    return {k: v for k, v in prompt.items() if isinstance(v, dict) and "class_type" in v}


def _image_name(value):
    return value[:-len(" [input]")] if isinstance(value, str) and value.endswith(" [input]") else value


def _workflow_images():
    """{image name: [workflow files]} for every LoadImage/LoadImageMask in the API workflows."""
    out = {}
    for wf in WORKFLOWS:
        for node in _load_workflow(wf).values():
            if node["class_type"] in ("LoadImage", "LoadImageMask") and isinstance(
                    node["inputs"].get("image"), str):
                out.setdefault(_image_name(node["inputs"]["image"]), []).append(wf.name)
    return out


def _write_sd_checkpoint(path):
    """tests/tiny_sd.py's random SD1.5 checkpoint, written by ComfyUI's interpreter (it is built with ComfyUI's
    classes, which this interpreter may not be able to import)."""
    env = dict(os.environ, COMFYUI_PATH=str(COMFY), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run([PYTHON, str(ROOT / "tests" / "tiny_sd.py"), str(path)], env=env, capture_output=True,
                       text=True, timeout=START_TIMEOUT)
    if r.returncode != 0 or not path.is_file():
        pytest.fail(f"tests/tiny_sd.py could not write {path} with {PYTHON}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def _ensure_sdxl_checkpoint(server):
    """Write tests/tiny_sd.py's random SDXL checkpoint into the server's checkpoints folder, once per session
    (ComfyUI re-lists a model folder whose modification time changed, so it is offered from then on)."""
    path = server.checkpoints_dir / SDXL_FILE
    if path.is_file():
        return path
    env = dict(os.environ, COMFYUI_PATH=str(COMFY), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    # tiny_sd.py writes NAME.part and renames it, so ComfyUI never lists a half-written file
    r = subprocess.run([PYTHON, str(ROOT / "tests" / "tiny_sd.py"), "--kind", "sdxl", str(path)], env=env,
                       capture_output=True, text=True, timeout=SDXL_WRITE_TIMEOUT)
    if r.returncode != 0 or not path.is_file():
        pytest.fail(f"tests/tiny_sd.py --kind sdxl could not write {path} with {PYTHON}:\n"
                    f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return path


def _write_small_images(input_dir):
    """SD_SIZE copies of the images that the SD workflows load, next to the originals (the pack ships those)."""
    from PIL import Image
    names = set()
    for wf in WORKFLOWS:
        prompt = _load_workflow(wf)
        if _uses_sd(prompt):
            names.update(_loaded_images(prompt))
    for name in sorted(names):
        with Image.open(ROOT / "example_images" / name) as im:
            im.resize(SD_SIZE, Image.Resampling.BICUBIC).save(input_dir / _small_name(name))


def _loaded_images(prompt):
    return [_image_name(n["inputs"]["image"]) for n in prompt.values()
            if n["class_type"] in ("LoadImage", "LoadImageMask") and isinstance(n["inputs"].get("image"), str)]


# --------------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfyui")
    base, extra = tmp / "base", tmp / "extra"
    input_dir, output_dir, temp_dir = base / "input", base / "output", base / "temp"
    for d in (base / "custom_nodes", base / "models" / "ddpm", input_dir, output_dir, temp_dir,
              base / "user", extra / "custom_nodes", extra / "models" / "ddpm",
              extra / "models" / "clip_guidance", extra / "models" / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
    (extra / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    tiny.save_unet(extra / "models" / "ddpm" / DDPM_FILE)
    tiny.save_clip(extra / "models" / "clip_guidance" / CLIP_FILE, "torchscript")
    (extra / "models" / "ddpm" / "README.txt").write_text("not a checkpoint\n")
    # a checkpoint in the pack's default folder (<models>/ddpm) must be listed next to the yaml one
    shutil.copy(extra / "models" / "ddpm" / DDPM_FILE, base / "models" / "ddpm" / "other_uncond.pt")
    _write_sd_checkpoint(extra / "models" / "checkpoints" / SD_FILE)
    _write_small_images(input_dir)
    yaml_path = tmp / "extra_model_paths.yaml"
    yaml_path.write_text(f"blended_diffusion_test:\n    base_path: {extra}\n"
                         f"    custom_nodes: custom_nodes\n    ddpm: models/ddpm\n"
                         f"    clip_guidance: models/clip_guidance\n    checkpoints: models/checkpoints\n")

    port = _free_port()
    cli = (COMFY / "comfy" / "cli_args.py").read_text()
    cmd = [PYTHON, "main.py", "--cpu", "--listen", HOST, "--port", str(port), "--disable-auto-launch",
           "--extra-model-paths-config", str(yaml_path), "--input-directory", str(input_dir),
           "--output-directory", str(output_dir), "--temp-directory", str(base)]  # ComfyUI adds /temp
    if '"--base-directory"' in cli:
        cmd += ["--base-directory", str(base)]
    if '"--database-url"' in cli:
        cmd += ["--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, BLENDED_DIFFUSION_LPIPS_RANDOM="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log_path = tmp / "comfyui.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=str(COMFY), stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(proc, port, log_path, base, input_dir, output_dir, temp_dir)
    srv.checkpoints_dir = extra / "models" / "checkpoints"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} at start:\n{srv.log_tail()}")
            try:
                srv.get("/queue", timeout=5)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT}s:\n{srv.log_tail()}")
                time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


@pytest.fixture
def ws(server):
    client_id = uuid.uuid4().hex
    sock = WebSocket(server.port, client_id)
    sock.client_id = client_id
    yield sock
    sock.close()


def _run(server, ws, prompt, timeout=PROMPT_TIMEOUT, on_message=None):
    """Queue `prompt`, follow it on the websocket; returns (prompt_id, history entry, messages)."""
    status, reply = server.post("/prompt", {"prompt": prompt, "client_id": ws.client_id})
    assert status == 200, f"/prompt refused the workflow: {json.dumps(reply, indent=1)[:4000]}"
    pid = reply["prompt_id"]
    messages, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=2)
        if msg is not None:
            messages.append(msg)
            if on_message is not None:
                on_message(pid, msg)
            if isinstance(msg, dict) and msg.get("data", {}).get("prompt_id") == pid and msg["type"] in (
                    "execution_success", "execution_error", "execution_interrupted"):
                break
        elif server.proc.poll() is not None:
            pytest.fail(f"ComfyUI died while running a prompt:\n{server.log_tail()}")
    while time.monotonic() < deadline:
        hist = server.get(f"/history/{pid}")
        if pid in hist:
            return pid, hist[pid], messages
        time.sleep(0.5)
    server.post("/interrupt", {})
    pytest.fail(f"prompt {pid} did not finish within {timeout}s:\n{server.log_tail()}")


def _error_text(entry, messages, server):
    errs = [m["data"] for m in messages if isinstance(m, dict) and m.get("type") == "execution_error"]
    detail = ""
    for e in errs:
        detail += (f"\nnode {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                   f"{e.get('exception_message')}\n" + "".join(e.get("traceback", []))[-3000:])
    return f"status {entry.get('status')}{detail}\n--- server log ---\n{server.log_tail(3000)}"


# --------------------------------------------------------------------------------------------- tests
def test_pack_registered(server):
    info = server.object_info
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{server.log_tail()}"
    for nid in NODE_IDS:
        node = info[nid]
        assert node["category"].startswith("Blended Diffusion"), (nid, node["category"])
        assert node.get("display_name"), f"{nid} has no display name"
        for name, spec in _input_specs(node).items():
            assert len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"), \
                f"{nid}.{name} has no tooltip"
    for t in (t for n in NODE_IDS for t in info[n]["output"]):
        assert t not in ("MODEL", "CLIP"), "custom types must not reuse core MODEL/CLIP"


@pytest.mark.parametrize("node_id,filename,also", [
    ("LoadDDPM", DDPM_FILE, "other_uncond.pt"),
    ("LoadCLIP", CLIP_FILE, None),
    ("CheckpointLoaderSimple", SD_FILE, None),
])
def test_loader_combos_list_model_folders(server, node_id, filename, also):
    info = server.object_info.get(node_id)
    assert info is not None, f"{node_id} not registered\n{server.log_tail()}"
    combos = [o for o in map(_combo_options, _input_specs(info).values()) if o is not None]
    listing = [o for opts in combos for o in opts]
    assert filename in listing, f"{filename} from extra_model_paths.yaml not offered by {node_id}: {combos}"
    if also:  # the pack's own <models>/ddpm folder is kept next to the yaml entry
        assert also in listing, f"{also} in <models>/ddpm not offered by {node_id}: {combos}"
        assert "README.txt" not in listing, f"{node_id} lists non-checkpoint files: {combos}"


def test_example_images_offered_by_loadimage(server):
    """The workflows' example images ship with the pack and LoadImage finds them (the pack puts them
    in ComfyUI's input folder; the test's input folder starts empty)."""
    wanted = _workflow_images()
    if not wanted:
        pytest.skip("no API workflow loads an image yet")
    info = server.get("/object_info/LoadImage")["LoadImage"]
    offered = set(_combo_options(_input_specs(info)["image"]) or [])
    missing = {k: v for k, v in wanted.items() if k not in offered}
    assert not missing, f"images the workflows load but LoadImage does not offer: {missing}"


def test_template_browser_serves_ui_workflows(server):
    """ComfyUI offers the pack's workflows/*.json in its template browser and serves each file."""
    ui = sorted(p for p in (ROOT / "workflows").glob("*.json")) if (ROOT / "workflows").is_dir() else []
    if not ui:
        pytest.skip("workflows/ holds no UI workflow yet")
    listed = server.get("/workflow_templates").get(PACK_NAME, [])
    assert sorted(listed) == sorted(p.stem for p in ui), listed
    for p in ui:
        url = f"/api/workflow_templates/{PACK_NAME}/{p.name}"
        try:
            served = server.get(url)
        except urllib.error.HTTPError as e:
            pytest.fail(f"GET {url} -> {e.code}: ComfyUI serves /api/workflow_templates/<pack>/ from the "
                        f"first of example_workflows/, example/, examples/, workflow/, workflows/ that exists "
                        f"in the pack, so the template browser lists {p.name} but cannot open it")
        assert served == json.loads(p.read_text()), url
        # the thumbnail the frontend asks for: /api/workflow_templates/<pack>/<name>.jpg
        thumb = f"/api/workflow_templates/{PACK_NAME}/{p.stem}.jpg"
        with urllib.request.urlopen(server.url(thumb), timeout=30) as r:
            assert r.status == 200 and r.read() == p.with_suffix(".jpg").read_bytes(), thumb


def test_web_extension_served(server):
    js = sorted((ROOT / "web").rglob("*.js")) if (ROOT / "web").is_dir() else []
    if not js:
        pytest.skip("the pack has no web extension")
    listed = server.get("/extensions")
    for f in js:
        url = f"/extensions/{PACK_NAME}/{f.relative_to(ROOT / 'web').as_posix()}"
        assert url in listed, (url, [u for u in listed if PACK_NAME in u])
        with urllib.request.urlopen(server.url(url), timeout=30) as r:
            assert r.read() == f.read_bytes(), url
        # every relative import must resolve on the server (a wrong ../ depth 404s in the browser)
        for spec in re.findall(r'^\s*import\s.*?from\s+"(\.[^"]+)"', f.read_text(), flags=re.M):
            target = urllib.parse.urljoin(server.url(url), spec)
            with urllib.request.urlopen(target, timeout=30) as r:
                assert r.status == 200, (url, spec, target)


def _run_workflow(server, ws, workflow):
    """Run an API workflow on the tiny models with FAST / SD_FAST settings: (prompt, history entry), succeeded."""
    prompt = _use_tiny_sd(_set_steps(_load_workflow(workflow), server.object_info, **FAST))
    if any(n["class_type"] == "CheckpointLoaderSimple" and n["inputs"]["ckpt_name"] == SDXL_FILE
           for n in prompt.values()):
        _ensure_sdxl_checkpoint(server)
        server._object_info = None  # list the new file in CheckpointLoaderSimple's combo
    missing = _unprovided_models(prompt, server.object_info)
    assert not missing, f"{workflow.name} needs model files that have no tiny stand-in here: {missing}"
    for node in prompt.values():  # an inversion it loads is saved first by the workflow that saves it
        if node["class_type"] == "LoadInversion":
            _saved_inversion(server, ws, node["inputs"]["filename"])
    pid, entry, messages = _run(server, ws, prompt)
    assert entry["status"]["status_str"] == "success", _error_text(entry, messages, server)
    return prompt, entry


def _saved_inversion(server, ws, filename):
    """The inversion file that LoadInversion's `filename` names; runs the workflow that saves it unless that
    already ran (e.g. when a test is selected alone)."""
    path = server.output_dir / f"{filename}.safetensors"
    if not path.is_file():
        producer = next((wf for wf in WORKFLOWS for n in _load_workflow(wf).values()
                         if n["class_type"] == "SaveInversion" and n["inputs"].get("filename") == filename), None)
        assert producer is not None, f"no API workflow saves the inversion {filename!r} that another one loads"
        _run_workflow(server, ws, producer)
        assert path.is_file(), f"{producer.name} did not write {path}"
    return path


def _image_files(server, outputs, nid):
    dirs = {"output": server.output_dir, "temp": server.temp_dir}
    return [dirs[im["type"]] / im.get("subfolder", "") / im["filename"]
            for im in outputs.get(nid, {}).get("images", [])]


def _pixels(path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# images per (node, output) of the SD workflows, each SD_SIZE (FidelityCurve's are counted from its CSV)
DIRECT_MSE = 1e-6  # latent MSE bound of Direct Inversion's reconstruction on the tiny checkpoints
SD_IMAGES = {("NullTextInvert", 1): 1, ("NullTextEdit", 0): 2, ("NullTextSDEdit", 0): 1, ("LoadInversion", 1): 1}
CSV_HEADER = "method,parameter,value,lpips,clip_distance"


def _fidelity_rows(inputs):
    n = len(inputs["t0_values"].split(",")) * (2 if inputs.get("plain_sdedit", True) else 1)
    return n + (len(inputs["skip_timesteps"].split(",")) if isinstance(inputs.get("ddpm"), list) else 0)


def _check_sd_outputs(server, workflow, prompt, outputs):
    """What the NULL-text nodes of a workflow on the tiny SD checkpoint must have produced."""
    from PIL import Image
    steps = SD_FAST["steps"]
    for nid, node in prompt.items():
        ct, inputs = node["class_type"], node["inputs"]
        if ct in ("SaveImage", "PreviewImage"):
            src, slot = prompt[inputs["images"][0]], inputs["images"][1]
            if src["class_type"] == "FidelityCurve":
                want = (1, PLOT_SIZE) if slot == 0 else (_fidelity_rows(src["inputs"]), SD_SIZE)
            elif src["class_type"] == "CompareInversionMethods":  # the table; the source, VAE, each method
                n = len(_compared(src["inputs"]))
                want = (1, _table_size(n + 1)) if slot == 0 else (n + 2, SD_SIZE)
            else:
                want = (SD_IMAGES[(src["class_type"], slot)], SD_SIZE)
            files = _image_files(server, outputs, nid)
            sizes = set()
            for f in files:
                with Image.open(f) as im:
                    sizes.add(im.size)
            assert (len(files), sizes) == (want[0], {want[1]}), \
                f"{workflow.name}: {ct} {nid} of {src['class_type']} output {slot}: {len(files)} images {sizes}"
        elif ct == "NullTextInvert":
            report = json.loads(outputs[nid]["text"][0])
            optimised = steps if report["method"] == "null-text" else 0  # per-step losses: null-text only
            assert report["steps"] == steps and len(report["final_losses"]) == optimised, report
            assert report["method"] == inputs["method"], report
            assert report["family"] == _family(prompt, inputs), report
            assert report["latent_mse"] >= 0 and report["pixel_mae"] is not None, report
            if report["method"] == "direct":  # Direct Inversion reconstructs exactly (up to float rounding)
                assert report["latent_mse"] < DIRECT_MSE, report
        elif ct == "SaveInversion":
            from safetensors import safe_open
            path = Path(outputs[nid]["text"][0])
            assert path == server.output_dir / f"{inputs['filename']}.safetensors" and path.is_file(), path
            with safe_open(str(path), framework="pt") as f:
                meta, latents = f.metadata(), f.get_tensor("latents")
            assert meta["format"] == "blended_diffusion.nulltext_inversion", meta
            invert = prompt[inputs["inversion"][0]]["inputs"]
            assert meta["family"] == _family(prompt, invert) and meta["method"] == invert["method"], meta
            assert meta["cond_kind"] == ("context+y" if meta["family"].startswith("SDXL") else "context"), meta
            assert meta["prompt"] == prompt[inputs["inversion"][0]]["inputs"]["prompt"] and int(meta["steps"]) == steps
            assert tuple(latents.shape) == (steps + 1, 4, SD_SIZE[1] // 8, SD_SIZE[0] // 8)
        elif ct == "FidelityCurve":
            text = outputs[nid]["text"][0]
            lines = text.strip().split("\n")
            assert lines[0] == CSV_HEADER and len(lines) - 1 == _fidelity_rows(inputs), text
            for line in lines[1:]:
                lp, dist = map(float, line.split(",")[-2:])
                assert 0 <= lp < 10 and 0 <= dist <= 2, line
            prefix = server.output_dir / inputs["filename_prefix"]
            written = [c for c in sorted(prefix.parent.glob(f"{prefix.name}_*.csv")) if c.read_text() == text]
            assert written, f"FidelityCurve wrote no {prefix}_NNNNN.csv with its CSV"
            with Image.open(written[-1].with_suffix(".png")) as im:
                assert im.size == PLOT_SIZE, im.size
        elif ct == "LoadInversion":
            _check_uses_saved_inversion(server, workflow, prompt, outputs, nid)
        elif ct == "CompareInversionMethods":
            _check_comparison(server, workflow, inputs, outputs[nid]["text"][0])
    _check_edit_rows(server, workflow, prompt, outputs)
    _check_sdedit_strengths(server, workflow, prompt, outputs)


def _compared(inputs):
    from blended_diffusion.models import compare as cmp
    return cmp.parse_methods(inputs["methods"])


def _table_size(rows):
    """CompareInversionMethods' table image (render.table with a thumbnail per row): (width, height)."""
    from blended_diffusion import render
    return render.TABLE_WIDTH, render.TABLE_TOP + render.TABLE_ROW + rows * render.table_row_height(True) + 8


def _check_comparison(server, workflow, inputs, text):
    """The comparison's CSV: the VAE row, then every method asked for in order, at SD_FAST's steps: Direct
    Inversion exact, NPI and Direct at 2 UNet calls a step, NULL-text more; the same CSV written to the output."""
    from blended_diffusion.models import compare as cmp
    rows, steps = cmp.read_csv(text), SD_FAST["steps"]
    assert [r.method for r in rows] == [cmp.VAE] + _compared(inputs), text
    by = {r.method: r for r in rows}
    assert by[cmp.VAE].eps_calls == 0 and by[cmp.VAE].latent_mse == 0, text
    for r in rows[1:]:
        assert 0 <= r.lpips < 10 and r.seconds > 0 and r.latent_mse >= 0, f"{workflow.name}: {r}"
    if "direct" in by:
        assert by["direct"].latent_mse < DIRECT_MSE and by["direct"].eps_calls == 2 * steps, text
    if "negative-prompt" in by:
        assert by["negative-prompt"].eps_calls == 2 * steps, text
    if "null-text" in by and SD_FAST["inner_steps"] > 0:
        assert by["null-text"].eps_calls > 2 * steps, text
    prefix = server.output_dir / inputs["filename_prefix"]
    written = [c for c in sorted(prefix.parent.glob(f"{prefix.name}_*.csv")) if c.read_text() == text]
    assert written and written[-1].with_suffix(".png").is_file(), f"{workflow.name}: no {prefix}_NNNNN.csv/.png"


def _family(prompt, invert_inputs):
    """The model family an inversion made from these NullTextInvert inputs must record."""
    loader = prompt[invert_inputs["model"][0]]["inputs"]["ckpt_name"]
    return "SDXL/EPS" if loader == SDXL_FILE else "SD15/EPS"


def _saved_from(prompt, outputs, server, node_id, slot):
    """The files of the SaveImage that saves output `slot` of node `node_id`, or []."""
    return next((_image_files(server, outputs, k) for k, n in prompt.items() if n["class_type"] == "SaveImage"
                 and n["inputs"]["images"] == [node_id, slot]), [])


def _check_edit_rows(server, workflow, prompt, outputs):
    """A prompt-to-prompt edit's first row (the caption sampled with the inversion's nulls and corrections) is the
    inversion's reconstruction, which the workflow saves; its second row is an edit."""
    for nid, node in prompt.items():
        if node["class_type"] != "NullTextEdit" or prompt[node["inputs"]["inversion"][0]]["class_type"] \
                != "NullTextInvert":
            continue
        recon = _saved_from(prompt, outputs, server, node["inputs"]["inversion"][0], 1)
        rows = _saved_from(prompt, outputs, server, nid, 0)
        if not recon or not rows:
            continue
        source_row, edit_row = rows
        diff = abs(_pixels(source_row) - _pixels(recon[0])).max()
        assert diff <= 2, f"{workflow.name}: the source row of edit {nid} is not the reconstruction ({diff}/255)"
        assert abs(_pixels(edit_row) - _pixels(source_row)).max() > 2, f"{workflow.name}: {nid} edited nothing"


def _check_sdedit_strengths(server, workflow, prompt, outputs):
    """SDEdits of one inversion at different strengths t0 give different images."""
    by_inv = {}
    for nid, node in prompt.items():
        if node["class_type"] == "NullTextSDEdit":
            files = _saved_from(prompt, outputs, server, nid, 0)
            if files:
                by_inv.setdefault(tuple(node["inputs"]["inversion"]), []).append((node["inputs"]["t0"], files[0]))
    for runs in by_inv.values():
        for (t_a, a), (t_b, b) in zip(runs, runs[1:]):
            if t_a != t_b:
                assert abs(_pixels(a) - _pixels(b)).max() > 2, \
                    f"{workflow.name}: SDEdit at t0 {t_a} and {t_b} gave the same image"


def _check_uses_saved_inversion(server, workflow, prompt, outputs, load_id):
    """The edits of a loaded inversion start from the saved trajectory: NullTextEdit's first row (the source
    sampled with the saved null embeddings) is the reconstruction that the saving workflow wrote, and the source
    image is the image that was inverted."""
    filename = prompt[load_id]["inputs"]["filename"]
    producer = next(wf for wf in WORKFLOWS for n in _load_workflow(wf).values()
                    if n["class_type"] == "SaveInversion" and n["inputs"].get("filename") == filename)
    made = _load_workflow(producer)
    invert = next(k for k, n in made.items() if n["class_type"] == "NullTextInvert")
    prefix = next(n["inputs"]["filename_prefix"] for n in made.values()
                  if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [invert, 1])
    image = made[made[invert]["inputs"]["image"][0]]["inputs"]["image"]  # its LoadImage's file
    recon = sorted((server.output_dir / prefix).parent.glob(f"{Path(prefix).name}_*.png"))
    assert recon, f"{producer.name} saved no reconstruction {prefix}"
    edits = [k for k, n in prompt.items()
             if n["class_type"] == "NullTextEdit" and n["inputs"]["inversion"] == [load_id, 0]]
    checked = 0
    for nid, node in prompt.items():
        src = node["inputs"].get("images")
        if node["class_type"] == "SaveImage" and src and src[0] in edits:
            source_row, edit_row = _image_files(server, outputs, nid)
            diff = abs(_pixels(source_row) - _pixels(recon[-1])).max()
            assert diff <= 2, f"{workflow.name}: the source row of {src[0]} is not {producer.name}'s reconstruction " \
                              f"(max difference {diff}/255)"
            assert abs(_pixels(edit_row) - _pixels(source_row)).max() > 2, f"{workflow.name}: {src[0]} edited nothing"
            checked += 1
        elif node["class_type"] == "PreviewImage" and src == [load_id, 1]:
            shown = _image_files(server, outputs, nid)[0]
            diff = abs(_pixels(shown) - _pixels(server.input_dir / _small_name(_image_name(image)))).max()
            assert diff <= 1, f"LoadInversion's source is not the image {producer.name} inverted ({diff}/255)"
            checked += 1
    assert checked, f"{workflow.name} shows nothing made from the loaded inversion"


@pytest.mark.parametrize("workflow", WORKFLOWS or [None], ids=lambda p: p.stem if p else "none")
def test_api_workflow_runs(server, ws, workflow):
    if workflow is None:
        pytest.skip("workflows/api/ holds no workflow yet")
    prompt, entry = _run_workflow(server, ws, workflow)
    outputs = entry["outputs"]
    assert outputs, f"{workflow.name} produced no outputs"
    n_images = 0
    for nid, node in prompt.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            images = _image_files(server, outputs, nid)
            assert images, f"{workflow.name}: {node['class_type']} {nid} returned no image"
            for f in images:
                assert f.is_file() and f.stat().st_size > 0, f
                n_images += 1
    assert n_images > 0, f"{workflow.name} saves or previews no image"
    if _uses_sd(prompt):
        _check_sd_outputs(server, workflow, prompt, outputs)


def _sampler_graph():
    """The first workflow's first sampler with only what it needs, and a PreviewImage of its result."""
    for wf in WORKFLOWS:
        prompt = _load_workflow(wf)
        sampler = next((k for k, n in prompt.items() if n["class_type"] == "BlendedDiffusionSampler"), None)
        if sampler is None:
            continue
        keep, todo = set(), [sampler]
        while todo:
            k = todo.pop()
            if k in keep:
                continue
            keep.add(k)
            todo += [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
        graph = {k: prompt[k] for k in keep}
        graph["bd_test_preview"] = {"class_type": "PreviewImage", "inputs": {"images": [sampler, 0]}}
        return wf, sampler, graph
    return None, None, None


def test_progress_preview_and_cancel_keeps_models(server, ws):
    wf, sampler, prompt = _sampler_graph()
    if wf is None:
        pytest.skip("no API workflow with a BlendedDiffusionSampler yet")
    sampler_ids = {sampler}
    long = _set_steps(json.loads(json.dumps(prompt)), server.object_info, respacing=100, skip=0,
                      strength=1.0, seed_offset=1000)
    seen = {"progress": [], "previews": 0, "interrupted": False}

    def on_message(pid, msg):
        if isinstance(msg, bytes):
            event, kind = struct.unpack(">II", msg[:8])
            if event == 1 and seen["progress"] and not seen["interrupted"]:  # after the sampler started
                assert kind == 1 and msg[8:10] == b"\xff\xd8", "preview is not a JPEG"
                seen["previews"] += 1
        else:
            data = msg.get("data", {})
            if (msg.get("type") == "progress" and data.get("prompt_id") == pid
                    and data.get("node") in sampler_ids):
                seen["progress"].append((data["value"], data["max"]))
        if seen["progress"] and seen["previews"] and not seen["interrupted"]:
            status, _ = server.post("/interrupt", {})
            assert status == 200
            seen["interrupted"] = True

    pid, entry, messages = _run(server, ws, long, on_message=on_message)
    assert seen["progress"], f"the sampler reported no progress:\n{_error_text(entry, messages, server)}"
    assert seen["previews"] >= 1, "the sampler sent no preview image"
    total = seen["progress"][0][1]
    assert total >= 50, f"progress max {total} for a 100-step run"
    assert seen["interrupted"], "the run ended before it could be cancelled"
    kinds = [m.get("type") for m in messages if isinstance(m, dict)]
    assert "execution_interrupted" in kinds, _error_text(entry, messages, server)
    assert entry["status"]["status_str"] == "error"
    assert seen["progress"][-1][0] < total, "cancel did not stop the loop"

    short = _set_steps(json.loads(json.dumps(prompt)), server.object_info, **FAST, seed_offset=2000)
    pid2, entry2, messages2 = _run(server, ws, short)
    assert entry2["status"]["status_str"] == "success", _error_text(entry2, messages2, server)
    # loaders whose widgets are the same in both prompts must be reused, not reloaded
    loader_ids = {k for k, n in prompt.items() if n["class_type"] in ("LoadDDPM", "LoadCLIP")
                  and long[k]["inputs"] == short[k]["inputs"]}
    cached = [m["data"].get("nodes", []) for m in messages2
              if isinstance(m, dict) and m.get("type") == "execution_cached"]
    cached = {n for c in cached for n in c}
    assert loader_ids <= cached, f"loaders re-ran after cancel (cached {sorted(cached)}, loaders {loader_ids})"


def _requested_loads(server, since: int) -> list[str]:
    """Class names in ComfyUI's 'Requested to load X' log lines (model management loading a model) after
    the log offset ``since``."""
    text = server.log_path.read_text(errors="replace")[since:]
    return re.findall(r"Requested to load (\w+)", text)


def _free_then_run(server, ws, prompt):
    """POST /free (unload_models + free_memory, which also drops the node cache), then run ``prompt``:
    (history entry, the class names model management loaded for it)."""
    status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    time.sleep(3)  # the idle prompt worker wakes on the flag and unloads before the next prompt is queued
    mark = len(server.log_path.read_text(errors="replace"))
    _, entry, messages = _run(server, ws, prompt)
    assert entry["status"]["status_str"] == "success", _error_text(entry, messages, server)
    return entry, _requested_loads(server, mark)


def test_free_unloads_our_models_and_the_next_prompt_reloads_them(server, ws):
    """POST /free with unload_models takes our UNet and CLIP out of ComfyUI's memory manager (issue 13): each
    prompt after it has model management load both again, and the same seed gives the same images."""
    wf, sampler, prompt = _sampler_graph()
    if wf is None:
        pytest.skip("no API workflow with a BlendedDiffusionSampler yet")
    prompt = _set_steps(prompt, server.object_info, **FAST, seed_offset=3000)
    first, loads = _free_then_run(server, ws, prompt)
    assert "UNetModel" in loads and "CLIP" in loads, f"our models were not loaded by ComfyUI: {loads}"
    before = [_pixels(f) for f in _image_files(server, first["outputs"], "bd_test_preview")]
    again, reloads = _free_then_run(server, ws, prompt)
    assert "UNetModel" in reloads and "CLIP" in reloads, \
        f"after /free our models were not loaded again (so /free did not unload them): {reloads}"
    after = [_pixels(f) for f in _image_files(server, again["outputs"], "bd_test_preview")]
    assert before and len(after) == len(before) and all((a == b).all() for a, b in zip(after, before)), \
        "the same prompt gave other images after /free"
