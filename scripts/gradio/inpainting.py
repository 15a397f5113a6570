"""Web demo: inpainting (paint over what to repaint, in the browser).

    python scripts/gradio/inpainting.py [--ckpt 512-inpainting-ema.ckpt \
        --config configs/stable-diffusion/v2-inpainting-inference.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default. Works with an inpainting checkpoint or any
text-to-image one (the shipped model by default), see ldm.generate_variants.inpaint.
"""
import sys

from webui import import_gradio, load_model, sampling_controls, serve, settings, shown_in_page, watermarked

EXAMPLE = "--ckpt 512-inpainting-ema.ckpt --config configs/stable-diffusion/v2-inpainting-inference.yaml"


def mask_of(layers, size):
    """White wherever any paint layer is not transparent."""
    from PIL import Image, ImageChops
    mask = Image.new("L", size, 0)
    for layer in layers or []:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a else 0)
        mask = ImageChops.lighter(mask, alpha.resize(size) if alpha.size != size else alpha)
    return mask


def make_generate(model, args):
    gr = import_gradio()
    from ldm.errors import UserError
    from ldm.generate_variants import inpaint

    @shown_in_page
    def generate(prompt, negative, steps, scale, seed, n_samples, editor, progress=gr.Progress(track_tqdm=True)):
        if not editor or editor.get("background") is None:
            raise UserError("upload an image first, then paint over what to repaint")
        image = editor["background"].convert("RGB")
        mask = mask_of(editor.get("layers"), image.size)
        if mask.getbbox() is None:
            raise UserError("paint over the part of the image to repaint first")
        images = inpaint(model, image, mask, **settings(prompt, negative, steps, scale, seed, n_samples))
        return watermarked(images, args)
    return generate


def build(args, model=None):
    gr = import_gradio()
    if model is None:
        model = load_model(args, ("inpainting", "txt2img"), EXAMPLE)
    with gr.Blocks(title="Inpainting", analytics_enabled=False) as demo:
        gr.Markdown("## Inpainting\nUpload an image, paint over what to repaint, describe what goes there.")
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(type="pil", label="Image and mask", sources=["upload", "clipboard"],
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                                        transforms=())
                controls = sampling_controls(gr, model, args)
                button = gr.Button("Inpaint", variant="primary")
            gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="result")
        button.click(make_generate(model, args), inputs=[*controls, editor], outputs=gallery)
    return demo


def main(argv=None):
    return serve(build, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
