"""Upscaling: enlarge an image x4 with the SD 2 x4 upscaler, guided by an optional prompt.

    python scripts/upscale.py --init-img small.png --prompt "a sharp photo of a cat" \
        --ckpt x4-upscaler-ema.ckpt --config configs/stable-diffusion/x4-upscaling.yaml

Inputs larger than --tile low-res pixels are upscaled in overlapping tiles blended together, so
memory stays bounded whatever the image size. --noise_level (0 to 350 for the official model)
noises the low-res input first: more noise, more freedom to invent detail.
"""
import sys

from ldm.cli import (ArgumentParser, add_common_args, check_common_args, existing_file, generate_and_save,
                     number_in, prepare, run)
from ldm.errors import UserError


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/upscale-samples")
    parser.set_defaults(scale=9.0, n_samples=1)
    parser.add_argument("--init-img", type=existing_file("init image"), required=True,
                        help="path to the low-resolution image")
    parser.add_argument("--noise_level", type=number_in("--noise_level", 0, kind=int), default=20,
                        help="noise added to the low-res image (0 = none; the model's maximum is checked)")
    parser.add_argument("--tile", type=number_in("--tile", 0, kind=int), default=128,
                        help="tile size in low-res pixels (0 = one piece; 128 makes 512-pixel tiles)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="low-res pixels neighbouring tiles share (default: a quarter of --tile, at most 32)")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.prompt is None and args.from_file is None:
        args.prompt = ""  # the upscaler works without text; the txt2img default prompt would mislead it
    check_common_args(args)
    if args.tile and args.tile_overlap is not None and not 0 <= args.tile_overlap < args.tile:
        raise UserError(f"--tile-overlap must be from 0 to {args.tile - 1}, got {args.tile_overlap}")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import check_noise_level, require_family, upscale
    from ldm.image_io import load_image
    low_res = load_image(args.init_img)
    model, prompts = prepare(args)
    require_family(model, "upscaling")
    check_noise_level(model, args.noise_level)
    return generate_and_save(args, lambda on_batch, **kw: upscale(
        model, low_res, prompts, noise_level=args.noise_level, tile=args.tile, tile_overlap=args.tile_overlap,
        on_batch=on_batch, **kw), noise_level=args.noise_level)


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
