"""``extrapolate``: text-guided extrapolation (supplement B.5.2), one prompt per side to extend."""
from __future__ import annotations

import time
from pathlib import Path

from ..render import to_pil
from . import CLIError
from .common import (StepBar, add_diffusion_args, add_model_args, add_parser as new_parser, check_at_least_one,
                     check_file_name, check_output_dir, count_steps, check_weights, load_models, log, parameters,
                     resolved_path, summary, use_example, write_json)
from .images import load_image

SIDES = ("left", "right", "up", "down")
SIDE_WORDS = {"left": "beyond its left edge", "right": "beyond its right edge", "up": "above its top edge",
              "down": "below its bottom edge"}


def add_parser(sub):
    x = new_parser(sub, "extrapolate", help="extend an image beyond its borders, guided by a prompt per side",
                   description="Text-guided extrapolation (paper supplement B.5.2). Name each side "
                               "to extend with its prompt, e.g. --left 'a lake' --right 'a forest'. "
                               "The result is at the model's resolution (its height is the model size "
                               "when extending left/right, its width when extending up/down).")
    x.add_argument("-i", "--init_image", type=str, default=None,
                   help="the image to extend (default: the bundled example)")
    for d in SIDES:
        x.add_argument(f"--{d}", metavar="PROMPT", nargs="?", const=True, default=None,
                       help=f"extend the image {SIDE_WORDS[d]} under this prompt (no text: use -p; '' = unguided)")
    x.add_argument("-p", "--prompt", type=str, default=None, help="prompt for the sides given without text")
    x.add_argument("--amount", type=float, default=0.5,
                   help="growth per side as a fraction of the image size (0.5 adds half the width)")
    x.add_argument("--k_min", type=int, default=None, help="fewest denoising steps of a stage (default 0.5·steps)")
    x.add_argument("--k_max", type=int, default=None, help="most denoising steps of a stage (default 0.8·steps)")
    x.add_argument("--final_k", type=int, default=None,
                   help="steps of the final unguided harmonising pass (default 0.2·steps, 0 = none)")
    add_diffusion_args(x)
    x.add_argument("--output_path", type=str, default="output", help="output folder")
    x.add_argument("-o", "--output_file", type=str, default="extrapolated.png", help="result file name")
    add_model_args(x)
    return x


def side_prompts(args) -> dict[str, str]:
    """{side: prompt} of the sides named; a side without text takes -p."""
    prompts = {}
    for d in SIDES:
        v = getattr(args, d)
        if v is None:
            continue
        if v is True:
            if args.prompt is None:
                raise CLIError(f"--{d} without a prompt needs -p PROMPT (or write --{d} 'PROMPT')")
            v = args.prompt
        prompts[d] = v
    if not prompts:
        raise CLIError("name at least one side to extend: --left/--right/--up/--down PROMPT")
    return prompts


def check_inputs(args) -> dict[str, str]:
    if args.init_image is None:
        use_example(args, "extending")
    prompts = side_prompts(args)
    check_at_least_one(args, ("aug_num",))
    check_weights(args, ("clip_guidance_lambda", "range_lambda"))
    check_file_name(args.output_file)
    count_steps(args.timestep_respacing)
    check_output_dir(args.output_path)
    return prompts


def cmd_extrapolate(args) -> int:
    from ..models.apps import extrapolate
    prompts = check_inputs(args)
    image = load_image(args.init_image)
    models = load_models(args, need_ddpm=True, need_clip=any(p.strip() for p in prompts.values()),
                         respacing=args.timestep_respacing)
    bar = StepBar(None, "extrapolating")
    t0 = time.time()
    try:
        out = extrapolate(models.ddpm, models.clip, image, prompts, args.amount, k_min=args.k_min, k_max=args.k_max,
                          final_k=args.final_k, seed=args.seed, clip_lambda=args.clip_guidance_lambda,
                          range_lambda=args.range_lambda, num_views=args.aug_num, ddim=args.ddim, callback=bar)
    except KeyboardInterrupt:
        log.warning("interrupted: nothing saved")
        return 130
    finally:
        bar.close()
    out_path = Path(args.output_path) / args.output_file
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pil = to_pil(out[0])
    pil.save(out_path)
    json_path = out_path.with_suffix(".json")
    write_json(json_path, {
        "command": "extrapolate", "argv": args.argv, "parameters": parameters(args),
        "resolved": {"init_image": resolved_path(args.init_image), "prompts": prompts,
                     "model": str(models.ddpm_file), "clip": str(models.clip_file) if models.clip_file else None,
                     "device": str(models.device), "precision": models.precision,
                     "respaced_steps": models.ddpm.num_steps},
        "input_size": [image.shape[-1], image.shape[-2]], "output_size": [pil.width, pil.height],
        "output": out_path.name, "elapsed_s": round(time.time() - t0, 2)})
    summary.info("extended %dx%d to %dx%d: %s (parameters %s)", image.shape[-1], image.shape[-2],
                 pil.width, pil.height, out_path, json_path)
    return 0
