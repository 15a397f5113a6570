"""Web demo: inpainting (paint over what to repaint, in the browser).

    python scripts/gradio/inpainting.py [--ckpt 512-inpainting-ema.ckpt \
        --config configs/stable-diffusion/v2-inpainting-inference.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default. Works with an inpainting checkpoint or any
text-to-image one (the shipped model by default), see ldm.generate_variants.inpaint.
"""
import sys

from webui import demo_page, page_handler, require_image, result_gallery, sampling_controls, serve

FAMILIES = ("inpainting", "txt2img")


def mask_of(layers, size):
    """White wherever any paint layer is not transparent."""
    from PIL import Image, ImageChops
    mask = Image.new("L", size, 0)
    for layer in layers or []:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a else 0)
        mask = ImageChops.lighter(mask, alpha.resize(size) if alpha.size != size else alpha)
    return mask


def make_generate(model, args):
    from ldm.errors import UserError
    from ldm.generate_variants import inpaint

    @page_handler(args)
    def generate(settings, editor):
        require_image((editor or {}).get("background"), ", then paint over what to repaint")
        image = editor["background"].convert("RGB")
        mask = mask_of(editor.get("layers"), image.size)
        if mask.getbbox() is None:
            raise UserError("paint over the part of the image to repaint first")
        return inpaint(model, image, mask, **settings)
    return generate


def build(args, model):
    def inputs(gr):
        editor = gr.ImageEditor(type="pil", label="Image and mask", sources=["upload", "clipboard"],
                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                                transforms=())
        return [*sampling_controls(gr, model, args), editor]
    return demo_page("Inpainting", "Upload an image, paint over what to repaint, describe what goes there.", inputs,
                     result_gallery, make_generate(model, args), button="Inpaint")


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES)


if __name__ == "__main__":
    sys.exit(main())
