"""Web demo: depth to image (re-draw an image keeping its depth; SD 2 depth model).

    python scripts/gradio/depth2img.py --ckpt 512-depth-ema.ckpt \
        --config configs/stable-diffusion/v2-midas-inference.yaml [--port 7860]

Serves on http://127.0.0.1:7860 by default. The depth comes from the checkpoint's MiDaS weights
unless a depth image (white = near) is uploaded.
"""
import sys

from webui import import_gradio, load_model, sampling_controls, serve, settings, shown_in_page, watermarked

EXAMPLE = "--ckpt 512-depth-ema.ckpt --config configs/stable-diffusion/v2-midas-inference.yaml"


def make_generate(model, args):
    gr = import_gradio()
    from ldm.errors import UserError
    from ldm.generate_variants import depth2img

    @shown_in_page
    def generate(prompt, negative, steps, scale, seed, n_samples, image, strength, depth_map,
                 progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise UserError("upload an image first")
        images, depth = depth2img(model, image, strength=float(strength), depth_map=depth_map,
                                  **settings(prompt, negative, steps, scale, seed, n_samples))
        return watermarked(images, args), depth
    return generate


def build(args, model=None):
    gr = import_gradio()
    if model is None:
        model = load_model(args, ("depth",), EXAMPLE)
    with gr.Blocks(title="Depth to image", analytics_enabled=False) as demo:
        gr.Markdown("## Depth to image")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"])
                controls = sampling_controls(gr, model, args, scale=9.0)
                strength = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="Strength (0 keeps the image)")
                depth_map = gr.Image(type="pil", label="Depth map (optional; white = near)",
                                     sources=["upload", "clipboard"])
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="result")
                depth = gr.Image(label="Depth used", format="png", interactive=False)
        button.click(make_generate(model, args), inputs=[*controls, image, strength, depth_map],
                     outputs=[gallery, depth])
    return demo


def main(argv=None):
    return serve(build, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
