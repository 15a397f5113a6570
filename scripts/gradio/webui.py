"""What the web demos share: flags, loading a model of the right family, the page layout, the prompt
and sampling controls, the handler around a generation function (watermarking, errors shown in the
page), and serving on 127.0.0.1.

Each demo is one command, e.g. ``python scripts/gradio/txt2img.py [--ckpt --config --port]``;
without --ckpt/--config the shipped default model is used where the family allows it. A demo module
has ``make_generate(model, args)`` (its handler, built with :func:`page_handler`), ``build(args, model)``
(its page, built with :func:`demo_page`) and ``main`` (:func:`serve`).
"""
import functools
import inspect

from ldm.cli import ArgumentParser, load_model_for, model_defaults, run, setup_logging, uses_shipped_model
from ldm.errors import UserError
from ldm.generate import MAX_SEED

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# The values of sampling_controls(), in order, as settings() takes them.
SAMPLING_INPUTS = ("prompt", "negative_prompt", "steps", "scale", "seed", "n_samples", "sampler", "schedule")


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("the web demos need gradio: pip install -e '.[web]'") from None
    return gradio


def parse_args(description, argv, add_flags=None):
    """The flags every demo takes, and those ``add_flags(parser)`` adds."""
    parser = ArgumentParser(description=description)
    add = parser.add_argument
    add("--ckpt", type=str, default=None, help="checkpoint .ckpt/.safetensors (default: the shipped model)")
    add("--config", type=str, default=None, help="model config .yaml (default: the shipped model's)")
    add("--trust-config", action="store_true", help="build any class the --config names (README: Safe loading)")
    add("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    add("--host", type=str, default=DEFAULT_HOST,
        help=f"address to serve on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes the demo)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    add("--no-watermark", action="store_true", help="do not embed the invisible watermark")
    add("--verbose", action="store_true", help="log details")
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be from 1 to 65535, got {args.port}")
    return args


def load_model(args, families, example=None):
    """The model of --ckpt/--config (or the shipped one), refused unless it is one of ``families``.
    ``example`` shows the flags for a model of the family when the shipped one does not fit."""
    from ldm.generate_variants import FAMILY_NAMES, require_family
    if "txt2img" not in families and uses_shipped_model(args.ckpt, args.config):
        wanted = " or ".join(FAMILY_NAMES[f] for f in families)
        raise UserError(f"this demo needs {wanted} model and the shipped model is text-to-image; "
                        f"pass e.g. {example}")
    model = load_model_for(args)
    require_family(model, *families)
    return model


def sampling_controls(gr, model, args, scale=None, prompt=None):
    """Prompt, negative prompt, steps, guidance scale, seed, number of images, sampler and schedule
    type (A1111's names), in that order."""
    from ldm.models.diffusion.samplers import DISPLAY_NAMES, SAMPLERS, SCHEDULE_LABELS
    defaults = model_defaults(args)
    controls = [gr.Textbox(label="Prompt", value=defaults["prompt"] if prompt is None else prompt, lines=2),
                gr.Textbox(label="Negative prompt", value="")]
    with gr.Accordion("Sampling options", open=False):
        controls += [
            gr.Slider(1, min(250, model.num_timesteps), value=defaults["steps"], step=1, label="Steps"),
            gr.Slider(1.0, 30.0, value=defaults["scale"] if scale is None else scale, step=0.1,
                      label="Guidance scale"),
            gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed"),
            gr.Slider(1, 4, value=1, step=1, label="Images"),
            gr.Dropdown([DISPLAY_NAMES[n] for n in SAMPLERS], value=defaults["sampler"], label="Sampler"),
            gr.Dropdown(["Automatic", *SCHEDULE_LABELS.values()], value="Automatic", label="Schedule type"),
        ]
    return controls


def image_input(gr, label="Image"):
    return gr.Image(type="pil", label=label, sources=["upload", "clipboard"])


def result_gallery(gr, columns=2):
    return gr.Gallery(label="Images", format="png", columns=columns, elem_id="result")


def demo_page(title, intro, inputs, outputs, handler, button="Generate"):
    """A page: ``title`` as heading and ``intro`` below it; on the left the components ``inputs(gr)``
    returns and a ``button``, on the right those ``outputs(gr)`` returns. The button calls ``handler``
    with the values of the inputs, in the order returned, and shows what it returns in the outputs."""
    gr = import_gradio()
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{intro}".strip())
        with gr.Row():
            with gr.Column():
                components = inputs(gr)
                press = gr.Button(button, variant="primary")
            with gr.Column():
                shown = outputs(gr)
        press.click(handler, inputs=components, outputs=shown)
    return demo


def require_image(image, hint=""):
    if image is None:
        raise UserError(f"upload an image first{hint}")


def settings(prompt, negative_prompt, steps, scale, seed, n_samples, sampler="DDIM", schedule="Automatic"):
    """The values of :func:`sampling_controls` as library keyword arguments."""
    from ldm.models.diffusion.samplers import AUTOMATIC, resolve_sampler, resolve_schedule
    if seed is None:
        raise UserError("enter a seed (a whole number)")
    sampler, combined = resolve_sampler(sampler or "DDIM")
    schedule = resolve_schedule(schedule or "Automatic")
    schedule = combined if schedule == AUTOMATIC else schedule
    return dict(prompts=prompt or "", negative_prompt=negative_prompt or "", steps=int(steps), scale=float(scale),
                seed=int(seed), n_samples=int(n_samples), sampler=sampler,
                schedule=None if schedule in (None, AUTOMATIC) else schedule)


def shown_in_page(fn):
    """Run a demo handler; a UserError appears in the page as an error message."""
    gr = import_gradio()

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err)) from None
    return handler


def watermarked(images, args):
    from ldm.image_io import make_watermarker, put_watermark
    encoder = make_watermarker(args.no_watermark)
    return [put_watermark(image, encoder) for image in images]


def page_handler(args):
    """Decorator: ``generate(settings, *inputs)`` becomes the handler of a page whose inputs are the
    sampling controls followed by ``inputs``.

    ``settings`` are the controls' values as library keyword arguments (:func:`settings`). ``generate``
    returns the images, or a tuple of the images and further outputs; the handler watermarks the
    images and shows a UserError in the page. Gradio passes one positional value per input and finds
    its progress tracker by a parameter's default, so the handler's signature lists the controls,
    then ``generate``'s own inputs, then ``progress`` (Gradio passes it last; it is not used here:
    ``track_tqdm`` follows the sampler's progress bar).
    """
    gr = import_gradio()

    def decorate(generate):
        own = list(inspect.signature(generate).parameters.values())[1:]
        n_inputs = len(SAMPLING_INPUTS) + len(own)

        @shown_in_page
        def handler(*values):
            values = values[:n_inputs]
            result = generate(settings(*values[:len(SAMPLING_INPUTS)]), *values[len(SAMPLING_INPUTS):])
            if isinstance(result, tuple):
                return (watermarked(result[0], args), *result[1:])
            return watermarked(result, args)

        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        handler.__signature__ = inspect.Signature(
            [*(inspect.Parameter(name, positional) for name in SAMPLING_INPUTS), *own,
             inspect.Parameter("progress", positional, default=gr.Progress(track_tqdm=True))])
        return handler
    return decorate


def serve(build, argv, doc, families, example=None, add_flags=None, load=None):
    """Parse flags (``doc``'s first line describes them; ``add_flags(parser)`` adds the demo's own), load
    the model (``load(args)``, by default one of ``families``, see :func:`load_model`), build the page
    with ``build(args, model)`` and serve it until interrupted."""
    def body(argv):
        args = parse_args(doc.splitlines()[0], argv, add_flags)
        setup_logging(args.verbose)
        import_gradio()
        model = load(args) if load is not None else load_model(args, families, example)
        demo = build(args, model)
        demo.queue(default_concurrency_limit=1)
        print(f"serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                    ssr_mode=False, quiet=True)
        return 0
    return run(body, argv)
