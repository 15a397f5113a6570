"""Web demo: x4 upscaling (SD 2 x4 upscaler, tiled for large inputs).

    python scripts/gradio/upscaling.py --ckpt x4-upscaler-ema.ckpt \
        --config configs/stable-diffusion/x4-upscaling.yaml [--port 7860]

Serves on http://127.0.0.1:7860 by default.
"""
import sys

from webui import import_gradio, load_model, sampling_controls, serve, settings, shown_in_page, watermarked

EXAMPLE = "--ckpt x4-upscaler-ema.ckpt --config configs/stable-diffusion/x4-upscaling.yaml"


def make_generate(model, args):
    gr = import_gradio()
    from ldm.errors import UserError
    from ldm.generate_variants import upscale

    @shown_in_page
    def generate(prompt, negative, steps, scale, seed, n_samples, image, noise_level, tile,
                 progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise UserError("upload an image first")
        images = upscale(model, image, noise_level=int(noise_level), tile=int(tile),
                         **settings(prompt, negative, steps, scale, seed, n_samples))
        return watermarked(images, args)
    return generate


def build(args, model=None):
    gr = import_gradio()
    from ldm.generate_variants import noise_level_range
    if model is None:
        model = load_model(args, ("upscaling",), EXAMPLE)
    lowest, highest = noise_level_range(model)
    with gr.Blocks(title="Upscaling", analytics_enabled=False) as demo:
        gr.Markdown("## x4 upscaling")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Low-resolution image", sources=["upload", "clipboard"])
                controls = sampling_controls(gr, model, args, scale=9.0, prompt="")
                noise_level = gr.Slider(lowest, highest, value=min(20, highest), step=1,
                                        label="Noise level (more invents more detail)")
                tile = gr.Slider(0, 512, value=128, step=32, label="Tile size in low-res pixels (0 = no tiling)")
                button = gr.Button("Upscale", variant="primary")
            gallery = gr.Gallery(label="Images", format="png", columns=1, elem_id="result")
        button.click(make_generate(model, args), inputs=[*controls, image, noise_level, tile], outputs=gallery)
    return demo


def main(argv=None):
    return serve(build, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
