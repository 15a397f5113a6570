"""Web demo: text to image steered by a ControlNet hint (an edge map, a scribble, a mask, ...).

    python scripts/gradio/controlnet.py                      # the shipped model and its mask ControlNet
    python scripts/gradio/controlnet.py --ckpt v1-5-pruned-emaonly.safetensors \
        --control control_v11p_sd15_canny.pth [--port 7860]

Serves on http://127.0.0.1:7860 by default. The shipped ControlNet's hint is a white-on-black mask of
where the shape goes; upload one (or any image with "threshold") and describe the shape.
"""
import sys

from webui import (
    demo_page,
    image_input,
    page_handler,
    require_image,
    result_gallery,
    sampling_controls,
    serve,
)

FAMILIES = ("controlnet",)
# depth needs MiDaS weights, which the page does not ask for
PAGE_PREPROCESSORS = ("none", "threshold", "canny", "scribble")


def add_flags(parser):
    parser.add_argument("--control", type=str, default=None,
                        help="ControlNet file attached to --ckpt (default: the shipped one with the shipped model)")


def load(args):
    from cldm.cli import control_files
    from cldm.loading import load_controlnet_model
    from ldm.errors import UserError
    if args.control is not None and args.ckpt is None:
        raise UserError("--control needs --ckpt, the base checkpoint the ControlNet is attached to")
    args.control = None if args.control is None else [args.control]
    base, controls = control_files(args)
    return load_controlnet_model(base, controls[0], args.config, device=args.device, trust_config=args.trust_config)


def make_generate(model, args):
    from cldm.generate import ControlUnit, controlnet_txt2img, hint_size
    from cldm.preprocess import preprocess
    from ldm.generate import native_size

    @page_handler(args)
    def generate(settings, image, preprocessor, strength, guess_mode):
        require_image(image, " (the hint, or the picture to make it from)")
        H, W = native_size(model)
        hint = preprocess(image, preprocessor, hint_size(model, H, W), what="the uploaded image")
        unit = ControlUnit(hint, weight=float(strength), guess_mode=bool(guess_mode))
        return controlnet_txt2img(model, settings.pop("prompts"), [unit], **settings), hint
    return generate


def build(args, model):
    def inputs(gr):
        controls = sampling_controls(gr, model, args)
        hint = image_input(gr, "Hint image")
        with gr.Accordion("ControlNet", open=True):
            extra = [gr.Dropdown(list(PAGE_PREPROCESSORS), value="none", label="Preprocessor"),
                     gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength"),
                     gr.Checkbox(value=False, label="Guess mode")]
        return [*controls, hint, *extra]

    def outputs(gr):
        return [result_gallery(gr), gr.Image(type="pil", label="Hint used", elem_id="hint")]
    return demo_page("ControlNet", "Upload a hint image (or a picture and a preprocessor), then describe the "
                     "image.", inputs, outputs, make_generate(model, args))


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES, add_flags=add_flags, load=load)


if __name__ == "__main__":
    sys.exit(main())
