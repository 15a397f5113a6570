"""Web demo: text to image.

    python scripts/gradio/txt2img.py [--ckpt model.ckpt --config model.yaml] [--port 7860]

Serves on http://127.0.0.1:7860 by default; without --ckpt/--config it uses the shipped model.
"""
import sys

from webui import import_gradio, load_model, sampling_controls, serve, settings, shown_in_page, watermarked

EXAMPLE = "--ckpt v2-1_512-ema-pruned.ckpt --config configs/stable-diffusion/v2-inference.yaml"


def make_generate(model, args):
    gr = import_gradio()
    from ldm.generate import txt2img

    @shown_in_page
    def generate(prompt, negative, steps, scale, seed, n_samples, sampler, H, W,
                 progress=gr.Progress(track_tqdm=True)):
        images = txt2img(model, sampler=sampler, H=int(H), W=int(W),
                         **settings(prompt, negative, steps, scale, seed, n_samples))
        return watermarked(images, args)
    return generate


def build(args, model=None):
    gr = import_gradio()
    from ldm.generate import SAMPLERS, native_size
    from ldm.generate_variants import size_multiple
    if model is None:
        model = load_model(args, ("txt2img",), EXAMPLE)
    height, width = native_size(model)
    multiple = size_multiple(model)
    with gr.Blocks(title="Text to image", analytics_enabled=False) as demo:
        gr.Markdown("## Text to image")
        with gr.Row():
            with gr.Column():
                controls = sampling_controls(gr, model, args)
                with gr.Accordion("Sampler and size", open=False):
                    sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler")
                    size = [gr.Slider(multiple, max(4 * side, 1024), value=side, step=multiple, label=label)
                            for label, side in (("Height", height), ("Width", width))]
                button = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="result")
        button.click(make_generate(model, args), inputs=[*controls, sampler, *size], outputs=gallery)
    return demo


def main(argv=None):
    return serve(build, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
