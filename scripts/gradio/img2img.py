"""Web demo: image to image (re-draw an uploaded image guided by a prompt, DDIM).

    python scripts/gradio/img2img.py [--ckpt model.ckpt --config model.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default; without --ckpt/--config it uses the shipped model.
"""
import sys

from webui import demo_page, image_input, page_handler, require_image, result_gallery, sampling_controls, serve

FAMILIES = ("txt2img",)


def make_generate(model, args):
    from ldm.generate import img2img

    @page_handler(args)
    def generate(settings, image, strength):
        require_image(image)
        return img2img(model, image, strength=float(strength), **settings)
    return generate


def build(args, model):
    def inputs(gr):
        image = image_input(gr)
        controls = sampling_controls(gr, model, args)
        strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Strength (0 keeps the image)")
        return [*controls, image, strength]
    return demo_page("Image to image", "The image is shrunk to a multiple of 64 pixels per side.", inputs,
                     result_gallery, make_generate(model, args))


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES)


if __name__ == "__main__":
    sys.exit(main())
