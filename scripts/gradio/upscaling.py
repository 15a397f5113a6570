"""Web demo: x4 upscaling (SD 2 x4 upscaler, tiled for large inputs).

    python scripts/gradio/upscaling.py --ckpt x4-upscaler-ema.ckpt \
        --config configs/stable-diffusion/x4-upscaling.yaml [--port 7860]

Serves on http://127.0.0.1:7860 by default.
"""
import sys

from webui import demo_page, image_input, page_handler, require_image, result_gallery, sampling_controls, serve

FAMILIES = ("upscaling",)
EXAMPLE = "--ckpt x4-upscaler-ema.ckpt --config configs/stable-diffusion/x4-upscaling.yaml"


def make_generate(model, args):
    from ldm.generate_variants import upscale

    @page_handler(args)
    def generate(settings, image, noise_level, tile):
        require_image(image)
        return upscale(model, image, noise_level=int(noise_level), tile=int(tile), **settings)
    return generate


def build(args, model):
    from ldm.generate_variants import noise_level_range
    lowest, highest = noise_level_range(model)

    def inputs(gr):
        image = image_input(gr, "Low-resolution image")
        controls = sampling_controls(gr, model, args, scale=9.0, prompt="")
        noise_level = gr.Slider(lowest, highest, value=min(20, highest), step=1,
                                label="Noise level (more invents more detail)")
        tile = gr.Slider(0, 512, value=128, step=32, label="Tile size in low-res pixels (0 = no tiling)")
        return [*controls, image, noise_level, tile]
    return demo_page("x4 upscaling", "", inputs, lambda gr: result_gallery(gr, columns=1),
                     make_generate(model, args), button="Upscale")


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES, EXAMPLE)


if __name__ == "__main__":
    sys.exit(main())
