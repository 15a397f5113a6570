"""ControlNet: text to image steered by a hint (edges, depth, a scribble, ...) through one or several ControlNets.

    python scripts/controlnet.py --ckpt v1-5-pruned-emaonly.safetensors \\
        --control control_v11p_sd15_canny.pth --hint photo.png --preprocess canny --prompt "a cosy cabin"
    python scripts/controlnet.py --ckpt v1-5-pruned-emaonly.safetensors \\
        --control control_v11p_sd15_canny.pth --control control_v11f1p_sd15_depth.pth --hint photo.png \\
        --preprocess canny --preprocess depth --midas-weights dpt_hybrid-midas-501f0c75.pt \\
        --control-strength 1 --control-strength 0.6 --control-end 1 --control-end 0.5 --prompt "..."

--control files are attached to the --ckpt base (a full control_sd15_*.pth can be --ckpt alone). The
hint each ControlNet used is written beside each result as OUTDIR/samples/NNNNN-hintK.png, and the
PNG metadata lists the units as sd-webui-controlnet does ("ControlNet 0: ...").
"""
import sys

from ldm.cli import (
    ArgumentParser,
    Saver,
    add_common_args,
    check_common_args,
    generate_and_save,
    prepare,
    run,
)


def build_parser():
    from cldm.cli import add_controlnet_args
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, outdir="outputs/controlnet-samples", size=True, fixed_code=True)
    add_controlnet_args(parser)
    return parser


def parse_args(argv):
    from cldm.cli import check_controlnet_args
    return check_controlnet_args(check_common_args(build_parser().parse_args(argv)))


class HintSaver(Saver):
    """Also writes each ControlNet's hint beside each saved sample (NNNNN-hint0.png, ...)."""

    def __init__(self, args, parameters, hints):
        super().__init__(args, parameters)
        self.hints = hints

    def __call__(self, images, prompts):
        from ldm.image_io import save_companion
        before = len(self.saved)
        super().__call__(images, prompts)
        for path in self.saved[before:]:
            for i, hint in enumerate(self.hints):
                save_companion(hint, path, f"hint{i}")


def _main(argv):
    args = parse_args(argv)
    from cldm.cli import control_units, load_controlnet_for
    from cldm.generate import controlnet_txt2img
    model, prompts = prepare(args, load=load_controlnet_for)
    units, hints, texts = control_units(args, model)
    return generate_and_save(args, lambda on_batch, **kw: controlnet_txt2img(
        model, prompts, units, H=args.H, W=args.W, fixed_code=args.fixed_code,
        only_mid_control=args.only_mid_control or None, on_batch=on_batch, **kw),
        saver_class=lambda a, parameters: HintSaver(a, parameters, hints), controlnet=texts)


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
