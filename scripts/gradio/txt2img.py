"""Web demo: text to image.

    python scripts/gradio/txt2img.py [--ckpt model.ckpt --config model.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default; without --ckpt/--config it uses the shipped model.
"""
import sys

from webui import demo_page, page_handler, result_gallery, sampling_controls, serve

FAMILIES = ("txt2img",)


def make_generate(model, args):
    from ldm.generate import txt2img

    @page_handler(args)
    def generate(settings, H, W):
        return txt2img(model, H=int(H), W=int(W), **settings)
    return generate


def build(args, model):
    from ldm.generate import native_size
    from ldm.generate_variants import size_multiple
    height, width = native_size(model)
    multiple = size_multiple(model)

    def inputs(gr):
        controls = sampling_controls(gr, model, args)
        with gr.Accordion("Size", open=False):
            size = [gr.Slider(multiple, max(4 * side, 1024), value=side, step=multiple, label=label)
                    for label, side in (("Height", height), ("Width", width))]
        return [*controls, *size]
    return demo_page("Text to image", "", inputs, result_gallery, make_generate(model, args))


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES)


if __name__ == "__main__":
    sys.exit(main())
