"""Packaging for the Comfy registry (issue 13): pyproject's [project] and [tool.comfy], the icon, package data."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()                 # the registry's advice for node ids
    assert project["name"][0].isalpha() and len(project["name"]) < 100
    assert len(project["version"].split(".")) == 3 and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Blended Diffusion"
    spec = comfy["requires-comfyui"]
    assert spec.startswith(">=")
    minimum = tuple(int(p) for p in spec[2:].split("."))
    assert minimum <= (0, 3, 64)                                     # the ComfyUI this pack is tested on
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/docs/icon.png")


def test_icon_is_the_projects_small_square_png():
    icon = Image.open(ROOT / "docs" / "icon.png")
    assert icon.format == "PNG" and icon.width == icon.height <= 400
    spec = importlib.util.spec_from_file_location("make_icon", ROOT / "docs" / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    assert np.array_equal(np.asarray(icon.convert("RGB")), np.asarray(make_icon.icon()))  # drawn by the project


def test_package_data_ships_the_web_extension_workflows_and_icon():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["blended_diffusion"]
    for pattern in ("web/js/*.js", "workflows/*.json", "workflows/api/*.json", "docs/icon.png"):
        assert pattern in data and list(ROOT.glob(pattern)), pattern
    assert (ROOT / "web" / "js" / "show_scores.js").is_file()
    assert "web" in PYPROJECT["tool"]["comfy"]["includes"]
