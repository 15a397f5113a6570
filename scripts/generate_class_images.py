"""Generate DreamBooth class images with the base model into a captioned folder (png + txt).

    python scripts/generate_class_images.py --class-prompt "a triangle" --shapes-phrases --n 100 \
        --outdir data/dreambooth/class
    python scripts/generate_class_images.py --from-file class_prompts.txt --n 200 --outdir class_images \
        --ckpt v1-5-pruned-emaonly.safetensors --config configs/stable-diffusion/v1-inference.yaml

Without --ckpt/--config the shipped model is used, with its default steps and guidance scale.
Images already in the folder (NNNNN.png with its NNNNN.txt) are kept and not generated again.
"""
import argparse
import sys
from pathlib import Path

from ldm.cli import (
    OFFICIAL_DEFAULTS,
    SHIPPED_DEFAULTS,
    TRUST_CONFIG_ADVICE,
    ArgumentParser,
    number_in,
    run,
    setup_logging,
    uses_shipped_model,
)
from ldm.errors import UserError


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--class-prompt", type=str, help="the class prompt, e.g. 'a photo of a dog'")
    prompts.add_argument("--from-file", type=str, help="class prompts, one per line, used in turn")
    add("--shapes-phrases", action="store_true",
        help="vary the class prompt with shapes position and background phrases (the shapes model)")
    add("--shapes-check", action="store_true",
        help="redraw (up to --max-redraws times) an image that does not show what its prompt names, read by "
             "ldm.data.shapes.describe: curated class images for the shapes model")
    add("--max-redraws", type=number_in("--max-redraws", 0, kind=int), default=8,
        help="with --shapes-check: redraws of one image before it is kept anyway")
    add("--n", type=number_in("--n", 1, kind=int), default=100, help="how many class images the folder should hold")
    add("--outdir", type=str, required=True, help="the class-image folder")
    add("--ckpt", type=str, default=None, help="base model weights (default: the shipped model)")
    add("--config", type=str, default=None, help="base model config")
    add("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    add("--sampler", type=str, default=SHIPPED_DEFAULTS["sampler"], help="sampler by its web-UI name")
    add("--steps", type=number_in("--steps", 1, kind=int), default=None,
        help="sampling steps (default: 25 with the shipped model, else 50)")
    add("--scale", type=float, default=None, help="guidance scale (default: 4 with the shipped model, else 7.5)")
    add("--seed", type=number_in("--seed", 0, kind=int), default=0, help="seed of the first image")
    add("--batch-size", type=number_in("--batch-size", 1, kind=int), default=4, help="images per batch")
    add("--trust-config", action="store_true", help="build any target the config names")
    add("--verbose", action="store_true", help="log progress")
    return parser


def class_prompts(args):
    if args.from_file is not None:
        try:
            lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read prompt file '{args.from_file}' ({err})") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"prompt file '{args.from_file}' has no prompts")
    else:
        prompts = [args.class_prompt]
    if args.shapes_phrases:
        from ldm.class_images import with_shapes_phrases
        prompts = with_shapes_phrases(prompts, args.n, seed=args.seed)
    return prompts


def _main(argv):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ldm.checkpoint import load_model
    from ldm.class_images import generate_class_images, shows_shapes_prompt
    from ldm.config_safety import UntrustedConfigError
    from ldm.models.diffusion.samplers import resolve_sampler
    sampler, schedule = resolve_sampler(args.sampler)
    prompts = class_prompts(args)
    defaults = SHIPPED_DEFAULTS if uses_shipped_model(args.ckpt, args.config) else OFFICIAL_DEFAULTS
    steps = args.steps or defaults["steps"]
    scale = args.scale if args.scale is not None else defaults["scale"]
    try:
        model = load_model(args.config, args.ckpt, device=args.device, trust_config=args.trust_config)
    except UntrustedConfigError as err:
        raise err.advise(TRUST_CONFIG_ADVICE) from None
    written = generate_class_images(model, prompts, args.outdir, args.n, batch_size=args.batch_size,
                                    seed=args.seed, sampler=sampler, schedule=schedule, steps=steps, scale=scale,
                                    accept=shows_shapes_prompt if args.shapes_check else None,
                                    max_redraws=args.max_redraws)
    print(f"{len(written)} class images written, {args.n - len(written)} already there, in {args.outdir}/")
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
