"""Image variations with stable unCLIP: new images from an image's CLIP embedding, optionally with text.

    python scripts/unclip.py --init-img cat.png --ckpt sd21-unclip-l.ckpt \
        --config configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml
    python scripts/unclip.py --embedding cat-embedding.pt --prompt "in the snow" --noise_level 200 ...

--noise_level noises the image embedding first (0 = closest to the image, up to the model's
maximum). Outputs go to OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting.
"""
import sys

from ldm.cli import (ArgumentParser, add_common_args, check_common_args, existing_file, generate_and_save,
                     number_in, prepare, run)
from ldm.errors import UserError


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/unclip-samples", size=True)
    parser.set_defaults(scale=10.0)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--init-img", type=existing_file("init image"), default=None,
                        help="image to make variations of")
    source.add_argument("--embedding", type=existing_file("embedding file"), default=None,
                        help="a CLIP image embedding [D] or [B, D] in a .pt or .safetensors file")
    parser.add_argument("--noise_level", type=number_in("--noise_level", 0, kind=int), default=0,
                        help="noise added to the image embedding")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.prompt is None and args.from_file is None:
        args.prompt = ""  # the image embedding alone drives the variations
    check_common_args(args)
    if args.init_img is None and args.embedding is None:
        raise UserError("pass --init-img (an image) or --embedding (a CLIP image embedding file)")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import check_noise_level, load_embedding, require_family, unclip_variations
    from ldm.image_io import load_image
    image = load_image(args.init_img) if args.init_img is not None else None
    embedding = load_embedding(args.embedding) if args.embedding is not None else None
    model, prompts = prepare(args)
    require_family(model, "unclip")
    check_noise_level(model, args.noise_level)
    return generate_and_save(args, lambda on_batch, **kw: unclip_variations(
        model, prompts, image=image, embedding=embedding, noise_level=args.noise_level, H=args.H, W=args.W,
        on_batch=on_batch, **kw), noise_level=args.noise_level)


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
