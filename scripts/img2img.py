"""Image to image: re-draw an init image guided by prompts (DDIM), save PNGs plus a grid.

    python scripts/img2img.py --init-img sketch.png --prompt "a red circle" --strength 0.6

The init image is shrunk to a multiple of 64 pixels per side. --strength 0 keeps it, 1 ignores
it. Outputs go to OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting.
"""
import sys

from ldm.cli import (ArgumentParser, add_common_args, check_common_args, existing_file, generate_and_save,
                     number_in, prepare, run)


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/img2img-samples")
    parser.add_argument("--init-img", type=existing_file("init image"), required=True,
                        help="path to the input image")
    parser.add_argument("--strength", type=number_in("--strength", 0.0, 1.0), default=0.75,
                        help="how much to change the init image, 0.0 to 1.0")
    return parser


def parse_args(argv):
    return check_common_args(build_parser().parse_args(argv))


def _main(argv):
    args = parse_args(argv)
    from ldm.generate import img2img
    from ldm.image_io import load_image
    init_image = load_image(args.init_img)
    model, prompts = prepare(args)
    return generate_and_save(args, lambda on_batch, **kw: img2img(
        model, init_image, prompts, strength=args.strength, on_batch=on_batch, **kw), strength=args.strength)


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
