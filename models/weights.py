"""Default weight files: where they are looked up, where they are downloaded to, how they are checked.

Pure Python (no torch, no ComfyUI). Folders, in lookup order:
- ComfyUI's ``models/ddpm`` and ``models/clip_guidance`` when the pack sits at
  ``<ComfyUI>/custom_nodes/<pack>/``;
- a user cache, ``$BLENDED_DIFFUSION_MODELS`` if set, else ``$XDG_CACHE_HOME/blended_diffusion`` or
  ``~/.cache/blended_diffusion``, with the same ``ddpm/`` and ``clip_guidance/`` subfolders.
Missing files are downloaded into the first of these folders: to ``<name>.part`` next to the final
file, resumed with an HTTP Range request after a dropped connection, checked against the published
sha256, then renamed atomically. A file that fails the check is deleted; nothing incomplete ever
carries the final name.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_MODELS_DIR = "BLENDED_DIFFUSION_MODELS"
PACK_ROOT = Path(__file__).resolve().parents[1]  # the pack's root folder (computed here only)
EXAMPLES_DIR = PACK_ROOT / "example_images"      # the bundled example images
FOLDERS = ("ddpm", "clip_guidance")


class WeightsError(RuntimeError):
    """A weight file is missing and could not be obtained."""


class DownloadError(WeightsError):
    """The download failed (offline, refused, HTTP error) after the allowed retries."""


class ChecksumError(WeightsError):
    """The downloaded bytes are not the published file; the partial file has been removed."""


@dataclass(frozen=True)
class WeightFile:
    name: str            # file name on disk
    folder: str          # "ddpm" or "clip_guidance"
    url: str
    description: str
    sha256: str = ""     # full hex digest, when published
    sha256_prefix: str = ""  # otherwise a known prefix and suffix of it (both must match)
    sha256_suffix: str = ""
    size: int | None = None  # bytes, when known

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix or self.sha256_suffix)

    def checksum_matches(self, hexdigest: str) -> bool:
        h = hexdigest.lower()
        if len(h) != 64:
            return False
        if self.sha256:
            return h == self.sha256.lower()
        return h.startswith(self.sha256_prefix.lower()) and h.endswith(self.sha256_suffix.lower())

    def expected_checksum(self) -> str:
        if self.sha256:
            return self.sha256
        return f"{self.sha256_prefix}…{self.sha256_suffix}" if self.has_checksum else "(none published)"


# The guided-diffusion 256x256 unconditional model. Its full sha256 (a37c32ff…c78b1) is the one recorded by
# several public download scripts (e.g. Disco Diffusion's model map); the file is reported as 2,211,383,297
# bytes, not enforced here (the sha256 decides).
DDPM_256 = WeightFile(
    name="256x256_diffusion_uncond.pt", folder="ddpm",
    url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    description="guided-diffusion 256x256 unconditional ImageNet model (the paper's model)",
    sha256="a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1")
# The class-conditional 512x512 model of the official --model_output_size 512. No checksum is published
# for it: the download is checked against the server's Content-Length only (and the loader checks the
# tensors).
DDPM_512 = WeightFile(
    name="512x512_diffusion.pt", folder="ddpm",
    url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/512x512_diffusion.pt",
    description="guided-diffusion 512x512 class-conditional ImageNet model")
# OpenAI CLIP ViT-B/16: OpenAI publishes the file's sha256 as a component of its URL.
CLIP_VIT_B16 = WeightFile(
    name="ViT-B-16.pt", folder="clip_guidance",
    url="https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    description="OpenAI CLIP ViT-B/16",
    sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f")

DEFAULT_WEIGHTS = {"ddpm_256": DDPM_256, "ddpm_512": DDPM_512, "clip": CLIP_VIT_B16}

# The LPIPS backbones: the lpips package (0.1.4) ships only its linear heads and gets the backbone from torchvision,
# which downloads it into $TORCH_HOME/hub/checkpoints at construction. torchvision names each file after the first
# 8 hex digits of its sha256 (and checks them).
LPIPS_VGG = WeightFile(
    name="vgg16-397923af.pth", folder="torch hub checkpoints",
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    description="torchvision VGG16 ImageNet weights (the LPIPS backbone: Algorithm 1's background loss, evaluation)",
    sha256_prefix="397923af")
LPIPS_ALEX = WeightFile(
    name="alexnet-owt-7be5be79.pth", folder="torch hub checkpoints",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    description="torchvision AlexNet ImageNet weights (LPIPS net='alex')", sha256_prefix="7be5be79")
LPIPS_WEIGHTS = {"vgg": LPIPS_VGG, "alex": LPIPS_ALEX}

ENV_OFFLINE = "BLENDED_DIFFUSION_OFFLINE"  # 1: never download weights (nodes, command line, LPIPS backbone)


def offline() -> bool:
    """Whether ``$BLENDED_DIFFUSION_OFFLINE`` forbids downloads (any value but empty, 0, false, no, off)."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no", "off")


def official(folder: str) -> list[WeightFile]:
    """The published files of one folder ("ddpm" or "clip_guidance"), offered by the loaders even when absent."""
    return [w for w in DEFAULT_WEIGHTS.values() if w.folder == folder]


def official_file(folder: str, name: str) -> WeightFile | None:
    """The published file of that folder and name, or None."""
    return next((w for w in official(folder) if w.name == name), None)


def model_metadata(folder: str, name: str) -> list[dict]:
    """ComfyUI frontend model metadata of a loader node choosing ``name`` (a node's ``properties.models``: a
    list of {name, url, directory}; frontend 1.27 lists the entries whose name is a widget value of the node in
    its missing-models dialog when the file is not in that model folder). Empty for unpublished files."""
    w = official_file(folder, name)
    return [] if w is None else [{"name": w.name, "url": w.url, "directory": w.folder}]


# --- folders ------------------------------------------------------------------------------------
def comfyui_models_dir(pack_root: Path = PACK_ROOT) -> Path | None:
    """``<ComfyUI>/models`` when the pack is installed as ``<ComfyUI>/custom_nodes/<pack>``."""
    pack_root = Path(pack_root)
    if pack_root.parent.name == "custom_nodes":
        models = pack_root.parent.parent / "models"
        if models.is_dir():
            return models
    return None


def cache_dir() -> Path:
    """The user cache for weights (outside ComfyUI): ``$BLENDED_DIFFUSION_MODELS`` or
    ``$XDG_CACHE_HOME/blended_diffusion`` or ``~/.cache/blended_diffusion``."""
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "blended_diffusion"


def search_dirs(folder: str, pack_root: Path = PACK_ROOT) -> list[Path]:
    """Folders where files of ``folder`` ("ddpm" or "clip_guidance") are looked up, in order; the first
    is where downloads go. $BLENDED_DIFFUSION_MODELS, when set, comes first (the user asked for it)."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown weight folder {folder!r}; use one of {FOLDERS}")
    dirs = []
    comfy = comfyui_models_dir(pack_root)
    if os.environ.get(ENV_MODELS_DIR):
        dirs.append(cache_dir() / folder)
    if comfy is not None:
        dirs.append(comfy / folder)
    dirs.append(cache_dir() / folder)
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def find(weight: WeightFile, pack_root: Path = PACK_ROOT) -> Path | None:
    """The first existing file of that name in the lookup folders, or None."""
    for d in search_dirs(weight.folder, pack_root):
        p = d / weight.name
        if p.is_file():
            return p
    return None


def ensure(weight: WeightFile | str, *, download: bool = True, progress: bool = True,
           pack_root: Path = PACK_ROOT, **download_kw) -> Path:
    """Path of a default weight file, downloading it (once, checked) when it is missing."""
    if isinstance(weight, str):
        if weight not in DEFAULT_WEIGHTS:
            raise KeyError(f"unknown weight {weight!r}; known: {sorted(DEFAULT_WEIGHTS)}")
        weight = DEFAULT_WEIGHTS[weight]
    found = find(weight, pack_root)
    if found is not None:
        log.debug("found %s at %s", weight.name, found)
        return found
    dest = search_dirs(weight.folder, pack_root)[0] / weight.name
    if not download or offline():
        raise WeightsError(
            f"{weight.name} ({weight.description}) is missing and downloads are off"
            f"{f' ({ENV_OFFLINE} is set)' if download else ''}. Download it from "
            f"{weight.url} and put it in {dest.parent}.")
    log.info("%s not found in %s: downloading it from %s", weight.name,
             ", ".join(str(d) for d in search_dirs(weight.folder, pack_root)), weight.url)
    if not weight.has_checksum:
        log.warning("no sha256 is published for %s: only its length is checked", weight.name)
    return download_file(weight.url, dest, weight=weight, progress=progress, **download_kw)


# --- download -----------------------------------------------------------------------------------
class _Retryable(Exception):
    pass


def _hash_existing(path: Path, h) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n


def _offline_message(url: str, dest: Path, reason) -> str:
    return (f"could not download {dest.name} from {url} ({reason}). If this machine is offline, "
            f"download {dest.name} elsewhere from {url} and put it in {dest.parent} "
            f"(or set {ENV_MODELS_DIR} to a folder with ddpm/ and clip_guidance/ subfolders).")


def download_file(url: str, dest: Path | str, *, weight: WeightFile | None = None, progress: bool = True,
                  retries: int = 3, backoff: float = 1.0, timeout: float = 60.0,
                  chunk_size: int = 1 << 20, report=None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``: resume (HTTP Range) after a dropped
    connection, up to ``retries`` retries with exponential ``backoff`` (none when the host name cannot be
    resolved: that fails at once); check length and sha256
    (from ``weight``); rename atomically. On a checksum mismatch the partial file is deleted. ``report(got,
    total)`` (total None when unknown) is called after every chunk: a host's progress display; an exception it
    raises (a cancel) stops the download, keeping ``dest.part`` for the next resume."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    name = dest.name
    attempt, bar = 0, [None]  # one progress bar across retries
    try:
        while True:
            h = hashlib.sha256()
            have = _hash_existing(part, h) if part.exists() else 0
            try:
                total, h = _fetch(url, part, have, h, timeout, chunk_size, progress, name, bar, tqdm, report)
                break
            except _Retryable as e:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(_offline_message(url, dest, e.args[0])) from None
                wait = backoff * 2 ** (attempt - 1)
                log.warning("download of %s failed (%s); retry %d/%d in %.0f s%s", name, e.args[0],
                            attempt, retries, wait, ", resuming" if part.exists() else "")
                time.sleep(wait)
    finally:
        if bar[0] is not None:
            bar[0].close()
    size = part.stat().st_size
    if total is not None and size != total:  # server said one length, we hold another
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{name}: received {size} bytes but the server announced {total}; the "
                            f"partial file was removed, run again to download it anew from {url}")
    if weight is not None:
        if weight.size is not None and size != weight.size:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{name} from {url}: {size} bytes, expected {weight.size}; the file "
                                "was removed. The server sent a different file: try again later, or "
                                f"download it by hand into {dest.parent}")
        digest = h.hexdigest()
        if weight.has_checksum and not weight.checksum_matches(digest):
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{name} from {url}: sha256 {digest} is not the published "
                                f"{weight.expected_checksum()}; the corrupt download was removed. Run "
                                f"again, or download it by hand into {dest.parent}")
    os.replace(part, dest)
    log.info("saved %s (%d bytes) to %s", name, size, dest)
    return dest


def _fetch(url, part: Path, have: int, h, timeout, chunk_size, progress, name, bar_holder, tqdm, report=None):
    """One HTTP request, appending to ``part`` from byte ``have``. Returns (total length or None, h)."""
    req = urllib.request.Request(url, headers={"User-Agent": "blended-diffusion-weights/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our partial file is not a prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 for a resume at byte {have}; starting over") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"could not download {name} from {url}: HTTP {e.code} {e.reason}. Download "
                            f"it by hand and put it in {part.parent}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, socket.gaierror):  # no DNS answer: retrying in seconds will not help
            host = urllib.parse.urlsplit(url).hostname
            raise DownloadError(_offline_message(
                url, part.with_name(name), f"the host {host} cannot be resolved: {reason.strerror or reason}")) from None
        raise _Retryable(reason) from None
    with resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        if have and status != 206:  # the server ignored the Range: take the whole file again
            log.info("server does not resume %s: downloading it from the start", name)
            have, h = 0, hashlib.sha256()
        mode = "ab" if have else "wb"
        total = (have + int(length)) if length is not None else None
        bar = bar_holder[0]
        if progress:
            if bar is None:
                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=name, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
                bar_holder[0] = bar
            else:
                bar.reset(total=total)
                bar.update(have)
        got = have
        with open(part, mode) as f:
            try:
                while True:
                    chunk = resp.read(chunk_size)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if report is not None:
                        report(got, total)
            except (OSError, http.client.HTTPException, socket.timeout) as e:
                raise _Retryable(f"connection lost after {got} bytes: {e or type(e).__name__}") from None
        if total is not None and got < total:
            raise _Retryable(f"connection closed after {got} of {total} bytes")
        return total, h


# --- LPIPS backbone -----------------------------------------------------------------------------
def torch_hub_checkpoints() -> Path:
    """Where torchvision looks for (and downloads) pretrained weights: ``$TORCH_HOME/hub/checkpoints``, TORCH_HOME
    defaulting to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch`` (torch.hub's rule, without importing torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def lpips_missing_message(net: str = "vgg", reason: object = None) -> str:
    """The error for an LPIPS backbone that is missing and could not be downloaded: file, URL, folder, command."""
    w = LPIPS_WEIGHTS[net]
    why = f" ({reason})" if reason else ""
    return (f"LPIPS needs torchvision's pretrained {net} backbone {w.name}, which is missing and could not be "
            f"downloaded{why}. Download {w.url} and put it in {torch_hub_checkpoints()} (the torch hub cache, "
            "$TORCH_HOME/hub/checkpoints), or run `blended-diffusion weights --lpips` on this machine while online.")


def ensure_lpips(net: str = "vgg", *, download: bool = True, progress: bool = True, **download_kw) -> Path:
    """The LPIPS backbone file in the torch hub cache, downloaded (checked) when missing unless downloads are off
    (``download=False`` or ``$BLENDED_DIFFUSION_OFFLINE``): then WeightsError names the file, URL and folder."""
    if net not in LPIPS_WEIGHTS:
        raise ValueError(f"unknown LPIPS network {net!r}; use one of {sorted(LPIPS_WEIGHTS)}")
    w = LPIPS_WEIGHTS[net]
    dest = torch_hub_checkpoints() / w.name
    if dest.is_file():
        return dest
    if not download or offline():
        raise WeightsError(lpips_missing_message(net, f"{ENV_OFFLINE} is set" if download else "downloads are off"))
    return download_file(w.url, dest, weight=w, progress=progress, **download_kw)
