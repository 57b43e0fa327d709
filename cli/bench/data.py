"""Benchmark datasets: PIE-Bench's published layout or a simple manifest, read into ``Item``s; and the
``Job`` (an item's pixels, ready for a worker) the driver makes of each.

PIE-Bench (``data/`` of the PnPInversion release): ``mapping_file.json`` maps each id to ``image_path``
(relative to ``annotation_images/``), ``original_prompt``, ``editing_prompt`` (edited words in [brackets]),
``editing_instruction``, ``editing_type_id`` ("0".."9"), ``blended_word`` ("cat dog": source word, target
word) and ``mask``: run-length pairs [start, length, ...] over the flattened 512×512 mask. The reference
decoder also sets the one-pixel border to 1; that mask is the one the metrics use, while the editing
methods get the annotated mask without the border ring.

Manifest: JSONL (one object a line) or CSV (a header line) with ``image``, ``mask`` (a mask image; any non-zero
pixel is edited; optional), ``prompt`` (the target), optional ``source_prompt``, ``id``, ``edit_type``,
``blended_word``. Relative paths are relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PIE_SIZE = (512, 512)
PIE_MAPPING = "mapping_file.json"
PIE_IMAGES = "annotation_images"
EDIT_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
              "4": "change attribute (content)", "5": "change attribute (pose)", "6": "change attribute (color)",
              "7": "change attribute (material)", "8": "change background", "9": "change style"}


METHODS = {"blended": "Blended Diffusion",
           "p2p": "NULL-text inversion + prompt-to-prompt",
           "sdedit": "SDEdit after NULL-text inversion",
           "sdedit-plain": "plain SDEdit"}
SD_METHODS = ("p2p", "sdedit", "sdedit-plain")


class DatasetError(ValueError):
    """The dataset cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Item:
    id: str
    image: str                    # path of the source image
    prompt: str                   # target prompt, brackets removed
    source_prompt: str = ""       # caption of the source (brackets removed); "" if unknown
    edit_type: str = ""
    instruction: str = ""
    blended_word: str = ""
    mask_rle: tuple | None = None  # PIE-Bench run-length mask over PIE_SIZE
    mask_file: str | None = None   # manifest mask image


@dataclass
class Job:
    """One item as a worker gets it: 8-bit pixels and masks, so no file has to exist on the worker's node.
    ``error`` set: the driver could not read the item (the worker records it without running anything)."""
    item: Item
    methods: list[str]
    image: np.ndarray | None = None       # [H, W, 3] uint8
    edit_mask: np.ndarray | None = None   # [H, W] bool: the region the methods edit; None = whole image
    eval_mask: np.ndarray | None = None   # [H, W] bool: the edited part for the metrics; None = whole image
    error: str | None = None
    attempt: int = 0
    crash: bool = field(default=False, repr=False)  # fault injection for tests (runner.CRASH_ENV)


def strip_brackets(prompt: str) -> str:
    """PIE-Bench marks the edited words with [brackets]: "a [dog] on grass" → "a dog on grass"."""
    return re.sub(r"\s+", " ", (prompt or "").replace("[", "").replace("]", "")).strip()


def decode_rle(rle, shape=PIE_SIZE, border: bool = True) -> np.ndarray:
    """PIE-Bench's run-length mask → bool [H, W]: pairs (start, length) over the row-major flattened mask,
    runs clipped at the end; ``border`` also sets the one-pixel frame (the reference decoder does)."""
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    values = [int(v) for v in rle]
    if len(values) % 2:
        raise DatasetError(f"run-length mask with an odd number of values ({len(values)}): expected "
                           "[start, length, start, length, ...]")
    for start, length in zip(values[0::2], values[1::2]):
        if start < 0 or length < 0:
            raise DatasetError(f"run-length mask with a negative start or length ({start}, {length})")
        flat[start:start + length] = True
    mask = flat.reshape(h, w)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_rle(mask: np.ndarray) -> list[int]:
    """bool [H, W] → PIE-Bench run-length pairs (the inverse of ``decode_rle`` without the border)."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).reshape(-1), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def load(path: str | Path) -> list[Item]:
    """A dataset: a PIE-Bench folder (holding mapping_file.json) or its mapping file, or a .jsonl/.csv
    manifest."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / PIE_MAPPING).is_file():
            raise DatasetError(f"{p}: no {PIE_MAPPING} in this folder; give PIE-Bench's data/ folder (with "
                               f"{PIE_MAPPING} and {PIE_IMAGES}/) or a .jsonl/.csv manifest")
        return load_pie(p / PIE_MAPPING)
    if not p.is_file():
        raise DatasetError(f"{p}: dataset not found")
    if p.name == PIE_MAPPING or (p.suffix == ".json" and p.stem.startswith("mapping")):
        return load_pie(p)
    if p.suffix.lower() in (".jsonl", ".csv"):
        return load_manifest(p)
    raise DatasetError(f"{p}: unknown dataset format; give PIE-Bench's data/ folder, its {PIE_MAPPING}, or a "
                       ".jsonl/.csv manifest")


def load_pie(mapping: Path) -> list[Item]:
    try:
        data = json.loads(mapping.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{mapping}: not a readable JSON mapping file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{mapping}: expected an object mapping ids to annotations")
    images = mapping.parent / PIE_IMAGES
    items = []
    for key, a in data.items():
        if not isinstance(a, dict) or "image_path" not in a or "editing_prompt" not in a:
            raise DatasetError(f"{mapping}: entry {key!r} lacks image_path / editing_prompt")
        items.append(Item(id=str(key), image=str(images / a["image_path"]),
                          prompt=strip_brackets(a.get("editing_prompt", "")),
                          source_prompt=strip_brackets(a.get("original_prompt", "")),
                          edit_type=str(a.get("editing_type_id", "")), instruction=a.get("editing_instruction", ""),
                          blended_word=(a.get("blended_word") or "").strip(),
                          mask_rle=tuple(a["mask"]) if a.get("mask") is not None else None))
    return items


def load_manifest(path: Path) -> list[Item]:
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{n}: not a JSON object ({e})") from None
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from None
    base = path.parent
    items, seen = [], set()
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not r.get("image") or r.get("prompt") is None:
            raise DatasetError(f"{path}: row {n} needs 'image' and 'prompt'")
        image = base / str(r["image"]).strip()
        item_id = str(r.get("id") or "").strip() or Path(str(r["image"])).stem
        if item_id in seen:
            raise DatasetError(f"{path}: row {n}: id {item_id!r} is used twice; give each row its own 'id'")
        seen.add(item_id)
        mask = str(r.get("mask") or "").strip()
        items.append(Item(id=item_id, image=str(image), prompt=strip_brackets(str(r["prompt"])),
                          source_prompt=strip_brackets(str(r.get("source_prompt") or "")),
                          edit_type=str(r.get("edit_type") or "").strip(),
                          instruction=str(r.get("instruction") or ""),
                          blended_word=str(r.get("blended_word") or "").strip(),
                          mask_file=str(base / mask) if mask else None))
    return items


def _resized(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 0


def make_job(item: Item, methods: list[str]) -> Job:
    """Read the item's image and masks (8-bit); a problem becomes the job's error, not an exception."""
    from ..images import load_image, load_mask  # the command line's readers: same rules as `edit`
    try:
        image = load_image(item.image)
        h, w = image.shape[-2:]
        edit_mask = eval_mask = None
        if item.mask_rle is not None:
            edit_mask = decode_rle(item.mask_rle, PIE_SIZE, border=False)
            eval_mask = decode_rle(item.mask_rle, PIE_SIZE, border=True)
            if (h, w) != PIE_SIZE:
                log.warning("%s: the image is %dx%d, PIE-Bench masks are %dx%d: mask resized (nearest)",
                            item.id, w, h, PIE_SIZE[1], PIE_SIZE[0])
                edit_mask, eval_mask = _resized(edit_mask, (h, w)), _resized(eval_mask, (h, w))
        elif item.mask_file:
            edit_mask = load_mask(item.mask_file, (h, w))[0].numpy() > 0
            eval_mask = edit_mask
        pixels = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
        return Job(item, list(methods), pixels, edit_mask, eval_mask)
    except Exception as e:  # a missing or unreadable file: recorded for this item, the run goes on
        return Job(item, list(methods), error=error_text(e))


def error_text(e: BaseException) -> str:
    """One line for a row's error: the pack's own messages as they are, others with their type."""
    text = (str(e).strip().splitlines() or [""])[0]
    own = type(e).__name__ in ("CLIError", "DatasetError", "CheckpointError", "WeightsError")
    return text if own and text else f"{type(e).__name__}: {text}" if text else type(e).__name__
