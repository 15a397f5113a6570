"""Web demo: depth to image (re-draw an image keeping its depth; SD 2 depth model).

    python scripts/gradio/depth2img.py --ckpt 512-depth-ema.ckpt \
        --config configs/stable-diffusion/v2-midas-inference.yaml [--port 7860]

Serves on http://127.0.0.1:7860 by default. The depth comes from the checkpoint's MiDaS weights
unless a depth image (white = near) is uploaded.
"""
import sys

from webui import demo_page, image_input, page_handler, require_image, result_gallery, sampling_controls, serve

FAMILIES = ("depth",)
EXAMPLE = "--ckpt 512-depth-ema.ckpt --config configs/stable-diffusion/v2-midas-inference.yaml"


def make_generate(model, args):
    from ldm.generate_variants import depth2img

    @page_handler(args)
    def generate(settings, image, strength, depth_map):
        require_image(image)
        return depth2img(model, image, strength=float(strength), depth_map=depth_map, **settings)  # (images, depth)
    return generate


def build(args, model):
    def inputs(gr):
        image = image_input(gr)
        controls = sampling_controls(gr, model, args, scale=9.0)
        strength = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="Strength (0 keeps the image)")
        depth_map = image_input(gr, "Depth map (optional; white = near)")
        return [*controls, image, strength, depth_map]

    def outputs(gr):
        return [result_gallery(gr), gr.Image(label="Depth used", format="png", interactive=False)]
    return demo_page("Depth to image", "", inputs, outputs, make_generate(model, args))


def main(argv=None):
    return serve(build, argv, __doc__, FAMILIES, EXAMPLE)


if __name__ == "__main__":
    sys.exit(main())
