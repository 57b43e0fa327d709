"""The pack's architecture: the engine (models/) imports nothing of the pack outside it and nothing of ComfyUI,
``host/`` is the only code that imports ComfyUI, and importing the library or running the command line's
--help loads no node module while ComfyUI still finds the node mappings at the pack root."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ComfyUI's top-level modules (its `nodes` too: the pack's own nodes/ is only ever imported relatively)
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "comfy_config", "folder_paths",
                   "server", "execution", "nodes", "node_helpers", "latent_preview"}
NODE_IDS = ["LoadDDPM", "LoadCLIP", "NoiseImage", "CLIPGuidedStep", "MaskBlend", "ExtendingAugment",
            "BlendedDiffusionSampler", "RankByCLIP", "Extrapolate", "BlendedDiffusionEvaluate", "NullTextInvert",
            "SaveInversion", "LoadInversion", "NullTextEdit", "NullTextSDEdit", "FidelityCurve",
            "CompareInversionMethods"]


def pack_sources():
    """The pack's Python files (tests and the example-image script excluded), relative to the root."""
    skip = {"tests", "example_images", "docs", "workflows", "web"}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] not in skip and not any(part.startswith(".") for part in rel.parts):
            yield rel


def imports(path: Path):
    """(level, module) of every import statement, nested ones included: level 0 = absolute."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((0, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_only_the_host_adapter_imports_comfyui():
    seen = {}
    for rel in pack_sources():
        for level, module in imports(ROOT / rel):
            if level == 0 and module.split(".")[0] in COMFYUI_MODULES:
                seen.setdefault(rel.parts[0], []).append(f"{rel}: {module}")
    assert set(seen) == {"host"}, seen
    assert {m.split(": ")[1].split(".")[0] for m in seen["host"]} >= {"comfy", "folder_paths"}


def test_the_engine_imports_nothing_of_the_pack_outside_it():
    for rel in pack_sources():
        if rel.parts[0] == "models":
            outside = [m for level, m in imports(ROOT / rel) if level >= 2]
            assert not outside, f"{rel} imports {outside} from outside models/"


def test_library_and_cli_help_import_no_node_module(tmp_path):
    """In a fresh interpreter with the pack importable as a package (as pip installs it)."""
    (tmp_path / "blended_diffusion").symlink_to(ROOT, target_is_directory=True)
    code = ("import json, runpy, sys\n"
            "def pack_modules():\n"
            "    return sorted(m for m in sys.modules if m.startswith(('blended_diffusion.nodes', "
            "'blended_diffusion.host')))\n"
            "import blended_diffusion.models\n"
            "library = pack_modules()\n"
            "sys.argv = ['blended_diffusion', '--help']\n"
            "try:\n    runpy.run_module('blended_diffusion', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "cli = pack_modules()\n"
            "import blended_diffusion\n"
            "ids, names = blended_diffusion.NODE_CLASS_MAPPINGS, blended_diffusion.NODE_DISPLAY_NAME_MAPPINGS\n"
            "print(json.dumps({'library': library, 'cli': cli, 'rc': rc, 'ids': list(ids),"
            " 'names': list(names), 'web': blended_diffusion.WEB_DIRECTORY,"
            " 'nodes_loaded': 'blended_diffusion.nodes' in sys.modules}))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["library"] == [] and out["cli"] == [] and out["rc"] == 0, out
    # ComfyUI's loader reads the mappings with hasattr/getattr on the pack module: that loads the nodes
    assert out["ids"] == NODE_IDS and sorted(out["names"]) == sorted(NODE_IDS) and out["nodes_loaded"]
    assert (ROOT / out["web"] / "js").is_dir()


def test_web_extension_keys_on_the_pack_not_on_node_names():
    """show_scores.js shows the text of any node of the pack (by its category) that returns some."""
    from blended_diffusion.nodes import NODE_CLASS_MAPPINGS
    from blended_diffusion.nodes.common import CATEGORY
    js = (ROOT / "web" / "js" / "show_scores.js").read_text()
    assert f'const CATEGORY = "{CATEGORY}";' in js and "message?.text" in js
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == CATEGORY or cls.CATEGORY.startswith(CATEGORY + "/"), name
        assert f'"{name}"' not in js, f"show_scores.js lists {name}: it must not need to"


def test_the_built_package_holds_every_module_and_the_web_extension(tmp_path):
    """setuptools' own build of the package (build_py: the packages of pyproject.toml and their package data, what
    a wheel holds) from a copy of the pack: every package and module, the web extension, workflows and images."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", "*.egg-info", "build",
                                                              "output", ".pytest_cache", "tests", "docs"))
    lib = tmp_path / "lib"
    ran = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                          "--build-lib", str(lib)], cwd=src, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    built = {p.relative_to(lib / "blended_diffusion").as_posix() for p in (lib / "blended_diffusion").rglob("*")
             if p.is_file()}
    packages = [ROOT] + [ROOT / p.parent for p in pack_sources() if p.name == "__init__.py" and p.parent.parts]
    wanted = {p.relative_to(ROOT).as_posix() for d in packages for p in d.glob("*.py")}
    wanted |= {p.relative_to(ROOT).as_posix() for pattern in ("web/**/*.js", "workflows/**/*.json",
                                                               "example_images/*.png") for p in ROOT.glob(pattern)}
    assert {"web/js/show_scores.js", "host/__init__.py", "host/sd.py", "models/inversion.py", "cli/__init__.py",
            "cli/runner.py", "cli/bench/runner.py", "cli/bench/bootstrap.py"} <= wanted
    assert wanted <= built, sorted(wanted - built)


def test_top_level_packages_are_the_layouts_and_pyproject_lists_every_package():
    """The pack's Python packages: the engine, the host adapter, the nodes and the command line (bench is part of the
    command line, the standalone runner too); pyproject.toml names each of them, subpackages included."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    top = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()}
    assert top == {"cli", "host", "models", "nodes"}, top
    assert not (ROOT / "nodes" / "runner.py").exists() and not (ROOT / "cli.py").exists()
    found = {"blended_diffusion"} | {"blended_diffusion." + ".".join(p.parent.parts) for p in pack_sources()
                                     if p.name == "__init__.py" and p.parent.parts}
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(listed) == found and "blended_diffusion.cli.bench" in found, (sorted(listed), sorted(found))


def test_every_subcommand_is_one_module_of_the_cli_package():
    """cli/: one module (or subpackage) per subcommand, each with add_parser and its command; the parser is
    assembled from them."""
    import importlib
    from blended_diffusion import cli
    for name in cli.SUBCOMMANDS:
        module = importlib.import_module(f"blended_diffusion.cli.{name}")
        assert callable(module.add_parser) and cli.COMMANDS[name] is getattr(module, f"cmd_{name}"), name
    assert (ROOT / "__main__.py").read_text().count("\n") < 10
