"""Text to image: sample a latent diffusion model from prompts and save PNGs plus a grid.

    python scripts/txt2img.py --prompt "a red circle on a blue square"
    python scripts/txt2img.py --prompt "..." --ckpt v2-1_512-ema-pruned.ckpt \
        --config configs/stable-diffusion/v2-inference.yaml --H 512 --W 512 --scale 9

Without --ckpt/--config the shipped default model is used at its native size. Outputs go to
OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting earlier ones.
"""
import sys

from ldm.cli import ArgumentParser, add_common_args, check_common_args, generate_and_save, prepare, run


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/txt2img-samples", size=True, fixed_code=True)
    return parser


def parse_args(argv):
    return check_common_args(build_parser().parse_args(argv))


def _main(argv):
    args = parse_args(argv)
    from ldm.generate import txt2img
    model, prompts = prepare(args)
    return generate_and_save(args, lambda on_batch, **kw: txt2img(
        model, prompts, H=args.H, W=args.W, fixed_code=args.fixed_code, on_batch=on_batch, **kw))


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
