"""Web demo: image to image (re-draw an uploaded image guided by a prompt, DDIM).

    python scripts/gradio/img2img.py [--ckpt model.ckpt --config model.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default; without --ckpt/--config it uses the shipped model.
"""
import sys

from webui import import_gradio, load_model, sampling_controls, serve, settings, shown_in_page, watermarked

EXAMPLE = "--ckpt v2-1_512-ema-pruned.ckpt --config configs/stable-diffusion/v2-inference.yaml"


def make_generate(model, args):
    gr = import_gradio()
    from ldm.errors import UserError
    from ldm.generate import img2img

    @shown_in_page
    def generate(prompt, negative, steps, scale, seed, n_samples, image, strength,
                 progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise UserError("upload an image first")
        images = img2img(model, image, strength=float(strength),
                         **settings(prompt, negative, steps, scale, seed, n_samples))
        return watermarked(images, args)
    return generate


def build(args, model=None):
    gr = import_gradio()
    if model is None:
        model = load_model(args, ("txt2img",), EXAMPLE)
    with gr.Blocks(title="Image to image", analytics_enabled=False) as demo:
        gr.Markdown("## Image to image\nThe image is shrunk to a multiple of 64 pixels per side.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"])
                controls = sampling_controls(gr, model, args)
                strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Strength (0 keeps the image)")
                button = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="result")
        button.click(make_generate(model, args), inputs=[*controls, image, strength], outputs=gallery)
    return demo


def main(argv=None):
    return serve(build, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
