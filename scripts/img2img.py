"""Image to image: re-draw an init image guided by prompts (DDIM), save PNGs plus a grid.

    python scripts/img2img.py --init-img sketch.png --prompt "a red circle" --strength 0.6

The init image is shrunk to a multiple of 64 pixels per side. --strength 0 keeps it, 1 ignores
it. Outputs go to OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting.
"""
import sys
from pathlib import Path

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args,
                     check_latent_flags, load_model_for, model_hash_for, read_prompts, run,
                     sampler_name, setup_logging)
from ldm.errors import UserError


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/img2img-samples")
    parser.add_argument("--init-img", type=str, required=True, help="path to the input image")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much to change the init image, 0.0 to 1.0")
    args = parser.parse_args(argv)
    check_common_args(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be from 0.0 to 1.0, got {args.strength}")
    if args.plms or args.dpm:
        raise UserError("img2img works with the DDIM sampler only; drop --plms/--dpm")
    if not Path(args.init_img).is_file():
        raise UserError(f"init image '{args.init_img}' does not exist")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate import img2img
    from ldm.image_io import load_image
    setup_logging(args.verbose)
    init_image = load_image(args.init_img)
    prompts = read_prompts(args)
    model = load_model_for(args)
    check_latent_flags(args, model)
    parameters = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler="ddim",
                      scale=args.scale, seed=args.seed, model_hash=model_hash_for(args),
                      eta=args.ddim_eta or None, strength=args.strength)
    saver = Saver(args, parameters)
    try:
        img2img(model, init_image, prompts, strength=args.strength,
                negative_prompt=args.negative_prompt, steps=args.steps, scale=args.scale,
                eta=args.ddim_eta, seed=args.seed, n_samples=args.n_samples, n_iter=args.n_iter,
                precision=args.precision, bf16=args.bf16, on_batch=saver)
    except BaseException:
        saver.report_partial()
        raise
    print(saver.finish())
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
