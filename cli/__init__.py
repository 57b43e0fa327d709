"""Command line: ``python -m blended_diffusion {edit,extrapolate,rank,fidelity,run,weights,bench} ...``
(also installed as the ``blended-diffusion`` console script).

One module per subcommand (edit.py, extrapolate.py, rank.py, fidelity.py, run.py, weights.py, bench/), each with
``add_parser(subparsers)`` and its ``cmd_*``; common.py holds what several share (flags, checks, device,
weights and models, records), images.py the image and mask files; runner.py is the standalone workflow executor
``run`` uses. This module assembles the parser, sets up logging and turns errors into one line.

``edit`` takes the official code's flags with their defaults (omriav/blended-diffusion main.py), so an
old command line can be pasted after ``edit`` (or with no subcommand at all). Only ``fidelity --sd-checkpoint``
and ``bench --sd-checkpoint`` import ComfyUI (host/sd.py loads Stable Diffusion checkpoints through ``comfy.sd``);
everything else runs without it.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys


class CLIError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


# The commands' modules import CLIError from here: it is defined first.
from . import bench, edit, extrapolate, fidelity, rank, run, weights  # noqa: E402
from .common import (HelpFormatter, StepBar, check_output_dir, find_example, log, resolve_device,  # noqa: E402,F401
                     resolve_precision, score_token, summary)
from .edit import contact_sheet, cpu_estimate, format_duration, job_seconds  # noqa: E402,F401
from .images import load_image, load_mask  # noqa: E402,F401
from .run import parse_override  # noqa: E402,F401

__all__ = ["CLIError", "COMMANDS", "SUBCOMMANDS", "build_parser", "main",  # and, for scripts and tests, the helpers:
           "StepBar", "check_output_dir", "contact_sheet", "cpu_estimate", "find_example", "format_duration",
           "job_seconds", "load_image", "load_mask", "parse_override", "resolve_device", "resolve_precision",
           "score_token"]
SUBCOMMANDS = ("edit", "extrapolate", "rank", "fidelity", "run", "weights", "bench")
COMMANDS = {"edit": edit.cmd_edit, "extrapolate": extrapolate.cmd_extrapolate, "rank": rank.cmd_rank,
            "fidelity": fidelity.cmd_fidelity, "run": run.cmd_run, "weights": weights.cmd_weights,
            "bench": bench.cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blended-diffusion", formatter_class=HelpFormatter,
        description="Blended Diffusion: text-driven editing of a region of a real image "
                    "(Avrahami et al., CVPR 2022), from the command line.",
        epilog="Run `%(prog)s SUBCOMMAND -h` for the options of each subcommand. An official "
               "command line (main.py -p ... -i ... --mask ...) works pasted after `edit`, or alone.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the summary")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in (edit, extrapolate, rank, fidelity, run, weights, bench):
        module.add_parser(sub)
    return parser


def _implicit_edit(argv: list[str]) -> list[str]:
    """An official command line without subcommand (``-p ... -i ...``) means ``edit``."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "--verbose", "-q", "--quiet"):
        return ["edit", *argv]
    return argv


@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool):
    root = logging.getLogger("blended_diffusion")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    old = root.level, root.propagate, summary.level, summary.propagate
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    root.propagate = False
    summary.setLevel(logging.INFO)
    summary.addHandler(out)
    summary.propagate = False
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm(loggers=[root, summary]):
            yield
    finally:
        root.removeHandler(handler)
        summary.removeHandler(out)
        root.level, root.propagate, summary.level, summary.propagate = old


def _memory_error_text(e: BaseException) -> str | None:
    """The error line of an out-of-memory error (with the fixes when the sampler did not name them), or None
    for another error."""
    from ..models.memory import out_of_memory
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    kind = out_of_memory(e)
    if "out of memory" in text.lower():
        return text
    if kind is None:
        return None
    # raised outside the sampler's batch splitting: name the fixes
    return (f"out of memory{', most likely' if kind == 'likely' else ''} ({text}): use a smaller "
            "--batch_size, fewer --aug_num views, --precision fp16/bf16 on a GPU or --clip_precision "
            "bf16, or close other programs")


def _run(args) -> int:
    """The command, its errors as one line: CLI and input errors and out of memory exit 1, Ctrl-C 130."""
    from ..models.checkpoint import CheckpointError
    from ..models.weights import WeightsError
    try:
        return COMMANDS[args.command](args)
    except (CLIError, WeightsError, CheckpointError, ValueError) as e:
        if args.verbose:
            log.exception("error")
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, torch's CPU allocator, oneDNN, Python
        text = _memory_error_text(e)
        if text is None:
            raise
        if args.verbose:
            log.exception("error")
        log.error("error: %s", text)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = _implicit_edit(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    with _logging(args.verbose, args.quiet):
        return _run(args)
