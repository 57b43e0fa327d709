"""``run``: an API-format workflow through the standalone runner (cli/runner.py), with --set overrides."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from . import CLIError
from .common import add_parser as new_parser, check_output_dir, log, made_dirs, remove_empty, summary, write_json


def add_parser(sub):
    u = new_parser(sub, "run", help="execute a workflows/api/*.json graph without ComfyUI",
                   description="Run an API-format workflow with the pack's standalone graph runner. "
                               "Override inputs with --set NODE_ID.INPUT=VALUE (repeatable).")
    u.add_argument("workflow", help="path to an API-format workflow JSON, or the name of one in workflows/api")
    u.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE", dest="overrides",
                   help="override an input, e.g. --set 3.seed=5 or --set 6.text='a red ball' "
                        "(values are parsed as JSON when they can be)")
    u.add_argument("--output_path", type=str, default="output", help="folder for the saved images")
    u.add_argument("--input_dir", type=str, default=None,
                   help="folder LoadImage reads from (default: the pack's example_images/; absolute paths in "
                        "--set N.image=/path/x.png work too)")
    u.add_argument("--models_dir", type=str, default=None,
                   help="folder with ddpm/ and clip_guidance/ subfolders holding the workflow's model files "
                        "(default: $BLENDED_DIFFUSION_MODELS, ComfyUI's models folder, ~/.cache/blended_diffusion)")
    u.add_argument("--list", action="store_true", help="list the bundled API workflows and exit")
    return u


def api_dir() -> Path:
    from ..models.weights import PACK_ROOT
    return PACK_ROOT / "workflows" / "api"


def parse_override(text: str) -> tuple[str, str, object]:
    """'3.seed=5' → ('3', 'seed', 5); values are JSON when they parse, else strings."""
    key, sep, value = text.partition("=")
    node, dot, name = key.strip().partition(".")
    if not sep or not dot or not node or not name:
        raise CLIError(f"--set {text!r}: write NODE_ID.INPUT=VALUE, e.g. --set 3.seed=5")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return node, name.strip(), parsed


def find_workflow(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    api = api_dir()
    for cand in (api / name, api / f"{name}.json"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in api.glob("*.json")) if api.is_dir() else []
    raise CLIError(f"workflow {name!r} not found (neither a file nor one of workflows/api: "
                   f"{', '.join(known) or 'none'})")


def read_workflow(path: Path) -> dict:
    """An API-format workflow file: {node id (str): {class_type, inputs}}."""
    try:
        workflow = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(workflow, dict) or not all(isinstance(v, dict) and "class_type" in v
                                                 for v in workflow.values()):
        raise CLIError(f"{path}: not an API-format workflow (a dict of node id → {{class_type, inputs}}); "
                       "in ComfyUI use 'Export (API)' to save one")
    return {str(k): v for k, v in workflow.items()}


def parse_overrides(workflow: dict, overrides: list[str]) -> dict:
    """--set texts → {node_id: {input: value}}, checked against the workflow."""
    out: dict[str, dict] = {}
    for text in overrides:
        node, name, value = parse_override(text)
        if node not in workflow:
            known = ", ".join(f"{k} ({v['class_type']})" for k, v in workflow.items())
            raise CLIError(f"--set {text!r}: the workflow has no node {node!r}; its nodes: {known}")
        inputs = workflow[node].get("inputs", {})
        if isinstance(inputs.get(name), list):
            raise CLIError(f"--set {text!r}: input {name!r} of node {node} ({workflow[node]['class_type']}) "
                           "is a link from another node, not a value")
        if name not in inputs:
            declared = _declared_inputs(workflow[node]["class_type"])
            if declared is not None and name not in declared:
                raise CLIError(f"--set {text!r}: node {node} ({workflow[node]['class_type']}) has no input "
                               f"{name!r}; its inputs: {', '.join(declared)}")
            log.warning("--set %s: input %r is not in the workflow's node %s; added", text, name, node)
        out.setdefault(node, {})[name] = value
    return out


def _declared_inputs(class_type: str) -> list[str] | None:
    """Inputs a pack node declares (required + optional), or None for other nodes."""
    from ..nodes import NODE_CLASS_MAPPINGS
    cls = NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return None
    types = cls.INPUT_TYPES()
    return [*types.get("required", {}), *types.get("optional", {})]


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _applied(workflow: dict, overrides: dict) -> dict:
    """The workflow's inputs after the overrides (what actually ran)."""
    return {nid: {**node.get("inputs", {}), **overrides.get(nid, {})} for nid, node in workflow.items()}


def execute(args, workflow: dict, overrides: dict, out_dir: Path):
    """The runner's result, or None after Ctrl-C; a failed run leaves no folder it made."""
    from ..models.weights import ENV_MODELS_DIR
    from . import runner
    created = made_dirs(out_dir)
    models_dir = str(Path(args.models_dir).expanduser().resolve()) if args.models_dir else None
    try:
        with _env(ENV_MODELS_DIR, models_dir):
            return runner.run_workflow(workflow, input_dir=args.input_dir, output_dir=str(out_dir),
                                       overrides=overrides)
    except BaseException as e:
        remove_empty(created)
        if isinstance(e, KeyboardInterrupt):
            return None
        if isinstance(e, FileNotFoundError):
            raise CLIError(str(e)) from None
        raise


def cmd_run(args) -> int:
    if args.list:
        for q in sorted(api_dir().glob("*.json")):
            summary.info("%s", q.stem)
        return 0
    path = find_workflow(args.workflow)
    workflow = read_workflow(path)
    overrides = parse_overrides(workflow, args.overrides)
    if args.input_dir is not None and not Path(args.input_dir).is_dir():
        raise CLIError(f"--input_dir {args.input_dir}: no such folder")
    out_dir = check_output_dir(args.output_path)
    t0 = time.time()
    result = execute(args, workflow, overrides, out_dir)
    if result is None:
        log.warning("interrupted")
        return 130
    texts = {nid: ui.get("text") for nid, ui in result.ui.items() if ui.get("text")}
    for nid, text in texts.items():
        for t in text:
            summary.info("node %s: %s", nid, t)
    json_path = out_dir / f"{path.stem}.run.json"
    write_json(json_path, {
        "command": "run", "argv": args.argv, "workflow": str(path.resolve()), "overrides": overrides,
        "prompt": dict(workflow), "applied": _applied(workflow, overrides),
        "outputs": [str(f) for f in result.files], "node_text": texts, "elapsed_s": round(time.time() - t0, 2)})
    summary.info("ran %s: %d file(s) saved in %s (record %s)", path.name, len(result.files), out_dir, json_path)
    return 0
