"""Inpainting and outpainting: repaint the white part of a mask, or extend the canvas and fill it.

    python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "a red circle"
    python scripts/inpaint.py --init-img photo.png --outpaint 0,64,0,0 --prompt "..."
    python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "..." \
        --ckpt 512-inpainting-ema.ckpt --config configs/stable-diffusion/v2-inpainting-inference.yaml

An inpainting checkpoint (9 U-Net input channels) is used as such; any text-to-image checkpoint
(the shipped default model included) inpaints by keeping the known region at every step.
Outputs go to OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting.
"""
import sys

from ldm.cli import (ArgumentParser, add_common_args, check_common_args, existing_file, generate_and_save, prepare,
                     run)
from ldm.errors import UserError


def parse_outpaint(text):
    parts = text.split(",")
    try:
        amounts = [int(p) for p in parts]
    except ValueError:
        amounts = []
    if len(amounts) != 4 or any(a < 0 for a in amounts):
        raise UserError(f"--outpaint takes four whole numbers of pixels 'left,right,top,bottom', got '{text}'")
    return amounts


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/inpaint-samples")
    parser.add_argument("--init-img", type=existing_file("init image"), required=True,
                        help="path to the image to repaint")
    parser.add_argument("--mask", type=existing_file("mask"), default=None,
                        help="mask image: white = repaint, black = keep (any mode; resized to the image)")
    parser.add_argument("--outpaint", type=str, default=None, metavar="L,R,T,B",
                        help="extend the canvas by these pixels left,right,top,bottom (rounded up to "
                             "multiples of 8) and fill the new area")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    check_common_args(args)
    args.outpaint = parse_outpaint(args.outpaint) if args.outpaint is not None else None
    if args.mask is None and args.outpaint is None:
        raise UserError("pass --mask (white = repaint) or --outpaint, or both")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import inpaint, open_image, outpaint_canvas
    from ldm.image_io import load_image
    image = load_image(args.init_img)
    mask = open_image(args.mask, "mask") if args.mask is not None else None
    if args.outpaint is not None:
        image, mask = outpaint_canvas(image, mask, *args.outpaint)
    model, prompts = prepare(args)
    return generate_and_save(args, lambda on_batch, **kw: inpaint(
        model, image, mask, prompts, on_batch=on_batch, **kw))


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
