"""Upscaling: enlarge an image x4 with the SD 2 x4 upscaler, guided by an optional prompt.

    python scripts/upscale.py --init-img small.png --prompt "a sharp photo of a cat" \
        --ckpt x4-upscaler-ema.ckpt --config configs/stable-diffusion/x4-upscaling.yaml

Inputs larger than --tile low-res pixels are upscaled in overlapping tiles blended together, so
memory stays bounded whatever the image size. --noise_level (0 to 350 for the official model)
noises the low-res input first: more noise, more freedom to invent detail.
"""
import sys
from pathlib import Path

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args, check_latent_flags,
                     load_model_for, model_hash_for, read_prompts, run, sampler_name, setup_logging)
from ldm.errors import UserError


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/upscale-samples")
    parser.set_defaults(scale=9.0, n_samples=1)
    parser.add_argument("--init-img", type=str, required=True, help="path to the low-resolution image")
    parser.add_argument("--noise_level", type=int, default=20,
                        help="noise added to the low-res image (0 = none; the model's maximum is checked)")
    parser.add_argument("--tile", type=int, default=128,
                        help="tile size in low-res pixels (0 = one piece; 128 makes 512-pixel tiles)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="low-res pixels neighbouring tiles share (default: a quarter of --tile, at most 32)")
    args = parser.parse_args(argv)
    if args.prompt is None and args.from_file is None:
        args.prompt = ""  # the upscaler works without text; the txt2img default prompt would mislead it
    check_common_args(args)
    if args.noise_level < 0:
        raise UserError(f"--noise_level must be 0 or more, got {args.noise_level}")
    if args.tile < 0:
        raise UserError(f"--tile must be 0 (no tiling) or more, got {args.tile}")
    if args.tile and args.tile_overlap is not None and not 0 <= args.tile_overlap < args.tile:
        raise UserError(f"--tile-overlap must be from 0 to {args.tile - 1}, got {args.tile_overlap}")
    if not Path(args.init_img).is_file():
        raise UserError(f"init image '{args.init_img}' does not exist")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import check_noise_level, require_family, upscale
    from ldm.image_io import load_image
    setup_logging(args.verbose)
    low_res = load_image(args.init_img)
    prompts = read_prompts(args)
    model = load_model_for(args)
    require_family(model, "upscaling")
    check_noise_level(model, args.noise_level)
    check_latent_flags(args, model)
    parameters = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=sampler_name(args),
                      scale=args.scale, seed=args.seed, model_hash=model_hash_for(args),
                      noise_level=args.noise_level)
    saver = Saver(args, parameters)
    try:
        upscale(model, low_res, prompts, noise_level=args.noise_level, tile=args.tile,
                tile_overlap=args.tile_overlap, negative_prompt=args.negative_prompt, sampler=sampler_name(args),
                steps=args.steps, scale=args.scale, eta=args.ddim_eta, seed=args.seed, n_samples=args.n_samples,
                n_iter=args.n_iter, precision=args.precision, bf16=args.bf16, on_batch=saver)
    except BaseException:
        saver.report_partial()
        raise
    print(saver.finish())
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
