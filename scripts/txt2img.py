"""Text to image: sample a latent diffusion model from prompts and save PNGs plus a grid.

    python scripts/txt2img.py --prompt "a red circle on a blue square"
    python scripts/txt2img.py --prompt "..." --ckpt v2-1_512-ema-pruned.ckpt \
        --config configs/stable-diffusion/v2-inference.yaml --H 512 --W 512 --scale 9

Without --ckpt/--config the shipped default model is used at its native size. Outputs go to
OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting earlier ones.
"""
import sys

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args,
                     check_latent_flags, load_model_for, model_hash_for, read_prompts, run,
                     sampler_name, setup_logging)
from ldm.errors import UserError


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/txt2img-samples")
    parser.add_argument("--H", type=int, default=None, help="image height in pixels "
                        "(a multiple of 8; default: the model's native size)")
    parser.add_argument("--W", type=int, default=None, help="image width in pixels "
                        "(a multiple of 8; default: the model's native size)")
    parser.add_argument("--fixed_code", action="store_true",
                        help="reuse one start noise for every round")
    args = parser.parse_args(argv)
    check_common_args(args)
    for flag in ("H", "W"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} must be a positive multiple of 8, got {value}")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate import txt2img
    setup_logging(args.verbose)
    prompts = read_prompts(args)
    model = load_model_for(args)
    check_latent_flags(args, model)
    parameters = dict(negative_prompt=args.negative_prompt, steps=args.steps,
                      sampler=sampler_name(args), scale=args.scale, seed=args.seed,
                      model_hash=model_hash_for(args), eta=args.ddim_eta or None)
    saver = Saver(args, parameters)
    try:
        txt2img(model, prompts, negative_prompt=args.negative_prompt, sampler=sampler_name(args),
                steps=args.steps, scale=args.scale, eta=args.ddim_eta, H=args.H, W=args.W,
                seed=args.seed, n_samples=args.n_samples, n_iter=args.n_iter,
                fixed_code=args.fixed_code, precision=args.precision, bf16=args.bf16,
                on_batch=saver)
    except BaseException:
        saver.report_partial()
        raise
    print(saver.finish())
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
