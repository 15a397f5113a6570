"""Depth to image: re-draw an image guided by prompts while keeping its depth (SD 2 depth model).

    python scripts/depth2img.py --init-img room.png --prompt "a cosy wooden cabin" \
        --ckpt 512-depth-ema.ckpt --config configs/stable-diffusion/v2-midas-inference.yaml
    python scripts/depth2img.py --init-img room.png --depth-map room-depth.png --prompt "..." ...

The depth comes from the checkpoint's MiDaS weights (depth_model.*) or from --depth-map (white =
near). The depth map used is written beside each result as OUTDIR/samples/NNNNN-depth.png.
"""
import sys

from ldm.cli import (ArgumentParser, Saver, add_common_args, check_common_args, existing_file,
                     generate_and_save, number_in, prepare, run)


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/depth2img-samples")
    parser.set_defaults(scale=9.0)
    parser.add_argument("--init-img", type=existing_file("init image"), required=True,
                        help="path to the input image")
    parser.add_argument("--strength", type=number_in("--strength", 0.0, 1.0), default=0.9,
                        help="how much to change the init image, 0.0 to 1.0 (its depth is kept)")
    parser.add_argument("--depth-map", type=existing_file("depth map"), default=None,
                        help="depth image to use instead of MiDaS (white = near; resized to the image)")
    return parser


def parse_args(argv):
    return check_common_args(build_parser().parse_args(argv))


class DepthSaver(Saver):
    """Also writes the depth map beside each saved sample (NNNNN-depth.png)."""

    depth_image = None

    def set_depth(self, image):
        self.depth_image = image

    def __call__(self, images, prompts):
        from ldm.image_io import save_companion
        before = len(self.saved)
        super().__call__(images, prompts)
        for path in self.saved[before:]:
            save_companion(self.depth_image, path, "depth")


def _main(argv):
    args = parse_args(argv)
    from ldm.generate_variants import depth2img, open_image
    from ldm.image_io import load_image
    init_image = load_image(args.init_img)
    depth_map = open_image(args.depth_map, "depth map") if args.depth_map is not None else None
    model, prompts = prepare(args)
    return generate_and_save(args, lambda on_batch, **kw: depth2img(
        model, init_image, prompts, strength=args.strength, depth_map=depth_map, on_batch=on_batch,
        on_depth=on_batch.set_depth, **kw), saver_class=DepthSaver, strength=args.strength)


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
