"""Image variations with stable unCLIP: new images from an image's CLIP embedding, optionally with text.

    python scripts/unclip.py --init-img cat.png --ckpt sd21-unclip-l.ckpt \
        --config configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml
    python scripts/unclip.py --embedding cat-embedding.pt --prompt "in the snow" --noise_level 200 ...

--noise_level noises the image embedding first (0 = closest to the image, up to the model's
maximum). Outputs go to OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png, never overwriting.
"""
import sys
from pathlib import Path

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args, check_latent_flags,
                     load_model_for, model_hash_for, read_prompts, run, sampler_name, setup_logging)
from ldm.errors import UserError


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/unclip-samples")
    parser.set_defaults(scale=10.0)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--init-img", type=str, default=None, help="image to make variations of")
    source.add_argument("--embedding", type=str, default=None,
                        help="a CLIP image embedding [D] or [B, D] in a .pt or .safetensors file")
    parser.add_argument("--noise_level", type=int, default=0, help="noise added to the image embedding")
    parser.add_argument("--H", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--W", type=int, default=None, help="image width (default: the model's native size)")
    args = parser.parse_args(argv)
    if args.prompt is None and args.from_file is None:
        args.prompt = ""  # the image embedding alone drives the variations
    check_common_args(args)
    if args.init_img is None and args.embedding is None:
        raise UserError("pass --init-img (an image) or --embedding (a CLIP image embedding file)")
    if args.noise_level < 0:
        raise UserError(f"--noise_level must be 0 or more, got {args.noise_level}")
    for flag in ("H", "W"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} must be a positive multiple of 8, got {value}")
    for what, path in (("init image", args.init_img), ("embedding file", args.embedding)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{what} '{path}' does not exist")
    return args


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import check_noise_level, load_embedding, require_family, unclip_variations
    from ldm.image_io import load_image
    setup_logging(args.verbose)
    image = load_image(args.init_img) if args.init_img is not None else None
    embedding = load_embedding(args.embedding) if args.embedding is not None else None
    prompts = read_prompts(args)
    model = load_model_for(args)
    require_family(model, "unclip")
    check_noise_level(model, args.noise_level)
    check_latent_flags(args, model)
    parameters = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=sampler_name(args),
                      scale=args.scale, seed=args.seed, model_hash=model_hash_for(args),
                      noise_level=args.noise_level)
    saver = Saver(args, parameters)
    try:
        unclip_variations(model, prompts, image=image, embedding=embedding, noise_level=args.noise_level,
                          negative_prompt=args.negative_prompt, sampler=sampler_name(args), steps=args.steps,
                          scale=args.scale, eta=args.ddim_eta, H=args.H, W=args.W, seed=args.seed,
                          n_samples=args.n_samples, n_iter=args.n_iter, precision=args.precision, bf16=args.bf16,
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
