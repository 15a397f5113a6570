"""Depth to image: re-draw an image guided by prompts while keeping its depth (SD 2 depth model).

    python scripts/depth2img.py --init-img room.png --prompt "a cosy wooden cabin" \
        --ckpt 512-depth-ema.ckpt --config configs/stable-diffusion/v2-midas-inference.yaml
    python scripts/depth2img.py --init-img room.png --depth-map room-depth.png --prompt "..." ...

The depth comes from the checkpoint's MiDaS weights (depth_model.*) or from --depth-map (white =
near). The depth map used is written beside each result as OUTDIR/samples/NNNNN-depth.png.
"""
import sys
from pathlib import Path

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args, check_latent_flags,
                     load_model_for, model_hash_for, read_prompts, run, setup_logging)
from ldm.errors import UserError


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/depth2img-samples")
    parser.set_defaults(scale=9.0)
    parser.add_argument("--init-img", type=str, required=True, help="path to the input image")
    parser.add_argument("--strength", type=float, default=0.9,
                        help="how much to change the init image, 0.0 to 1.0 (its depth is kept)")
    parser.add_argument("--depth-map", type=str, default=None,
                        help="depth image to use instead of MiDaS (white = near; resized to the image)")
    args = parser.parse_args(argv)
    check_common_args(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be from 0.0 to 1.0, got {args.strength}")
    if args.plms or args.dpm:
        raise UserError("depth2img works with the DDIM sampler only; drop --plms/--dpm")
    for what, path in (("init image", args.init_img), ("depth map", args.depth_map)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{what} '{path}' does not exist")
    return args


class DepthSaver(Saver):
    """Also writes the depth map beside each saved sample (NNNNN-depth.png)."""

    depth_image = None

    def set_depth(self, image):
        self.depth_image = image

    def __call__(self, images, prompts):
        before = len(self.saved)
        super().__call__(images, prompts)
        for path in self.saved[before:]:
            self.depth_image.save(path.with_name(f"{path.stem}-depth.png"))


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import depth2img, open_image
    from ldm.image_io import load_image
    setup_logging(args.verbose)
    init_image = load_image(args.init_img)
    depth_map = open_image(args.depth_map, "depth map") if args.depth_map is not None else None
    prompts = read_prompts(args)
    model = load_model_for(args)
    check_latent_flags(args, model)
    parameters = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler="ddim",
                      scale=args.scale, seed=args.seed, model_hash=model_hash_for(args),
                      eta=args.ddim_eta or None, strength=args.strength)
    saver = DepthSaver(args, parameters)
    try:
        depth2img(model, init_image, prompts, strength=args.strength, depth_map=depth_map,
                  negative_prompt=args.negative_prompt, steps=args.steps, scale=args.scale, eta=args.ddim_eta,
                  seed=args.seed, n_samples=args.n_samples, n_iter=args.n_iter, precision=args.precision,
                  bf16=args.bf16, on_batch=saver, on_depth=saver.set_depth)
    except BaseException:
        saver.report_partial()
        raise
    print(saver.finish())
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
