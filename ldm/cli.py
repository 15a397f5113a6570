"""What the sampling scripts share: flags, checks of impossible flag values, logging set-up,
saving as batches arrive, and turning a UserError into one ``error: ...`` line with exit code 2.
"""
import argparse
import logging
import sys
from pathlib import Path

from ldm.errors import UserError

EXIT_USER_ERROR = 2
DEFAULT_PROMPT = "a professional photograph of an astronaut riding a triceratops"
# Defaults when the flags are not given: the shipped shapes model was tuned for fewer steps and a
# lower guidance scale than the official checkpoints (see bench/shapes_fidelity.py).
SHIPPED_DEFAULTS = {"prompt": "a red circle on a white background", "steps": 25, "scale": 4.0}
OFFICIAL_DEFAULTS = {"prompt": DEFAULT_PROMPT, "steps": 50, "scale": 7.5}


def uses_shipped_model(ckpt=None, config=None):
    if ckpt is None and config is None:
        return True
    from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT
    return ckpt is not None and Path(ckpt).resolve() == (REPO_ROOT / DEFAULT_CKPT).resolve()


def default_scale(ckpt=None, config=None):
    return (SHIPPED_DEFAULTS if uses_shipped_model(ckpt, config) else OFFICIAL_DEFAULTS)["scale"]


def fill_model_defaults(args):
    """Fill --prompt/--steps/--scale left unset with the defaults of the model being used."""
    defaults = SHIPPED_DEFAULTS if uses_shipped_model(args.ckpt, args.config) else OFFICIAL_DEFAULTS
    for name, value in defaults.items():
        if name == "prompt" and getattr(args, "from_file", None) is not None:
            continue
        if getattr(args, name, None) is None:
            setattr(args, name, value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UserError (one line) instead of usage + exit."""

    def error(self, message):
        raise UserError(message)


def add_common_args(parser, outdir):
    """Flags of both txt2img and img2img (official names; ``--steps`` also as ``--ddim_steps``)."""
    add = parser.add_argument
    add("--prompt", type=str, default=None,
        help=f"what to render (default: '{SHIPPED_DEFAULTS['prompt']}' with the shipped model, "
             f"else '{DEFAULT_PROMPT}')")
    add("--negative-prompt", type=str, default="", help="what to steer away from")
    add("--from-file", type=str, default=None, help="read prompts from this file, one per line")
    add("--repeat", type=int, default=1, help="with --from-file, run each prompt this many times")
    add("--outdir", type=str, default=outdir, help="where samples/ and the grids go")
    add("--steps", "--ddim_steps", dest="steps", type=int, default=None,
        help=f"sampling steps (default: {SHIPPED_DEFAULTS['steps']} with the shipped model, "
             f"{OFFICIAL_DEFAULTS['steps']} otherwise)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plms", action="store_true", help="use the PLMS sampler")
    group.add_argument("--dpm", action="store_true", help="use the DPM-Solver sampler")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    add("--n_iter", type=int, default=1,
        help="sampling rounds (official default 3; 1 here since CPU runs are slow)")
    add("--n_samples", type=int, default=3, help="images per round (the batch size)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=None,
        help=f"classifier-free guidance scale (default: {SHIPPED_DEFAULTS['scale']} with the shipped "
             f"model, {OFFICIAL_DEFAULTS['scale']} otherwise; official SD 2.x scripts use 9.0)")
    add("--C", type=int, default=None, help="latent channels (default: the model's)")
    add("--f", type=int, default=None, help="downsampling factor (default: the model's)")
    add("--config", type=str, default=None, help="model config .yaml (default: shipped model)")
    add("--ckpt", type=str, default=None, help="checkpoint .ckpt/.safetensors (default: shipped)")
    add("--seed", type=int, default=42, help="seed for reproducible sampling")
    add("--precision", type=str, choices=["full", "autocast"], default="autocast",
        help="autocast: float16 on CUDA (bfloat16 with --bf16); full: float32")
    add("--bf16", action="store_true", help="compute in bfloat16 (CPU or CUDA)")
    add("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    add("--skip_grid", action="store_true", help="do not save a grid")
    add("--skip_save", action="store_true", help="do not save individual samples")
    add("--no-watermark", action="store_true", help="do not embed the invisible watermark")
    add("--verbose", action="store_true", help="log details (keys ignored while loading, ...)")
    add("--attention", choices=["auto", "sdpa", "xformers", "math"], default="auto",
        help="attention kernel (auto: xformers when installed and on CUDA, else PyTorch SDPA); "
             "ATTN_PRECISION=fp16 turns off the float32 attention logits used under autocast")


def check_common_args(args):
    """Refuse impossible values before anything slow happens."""
    fill_model_defaults(args)
    for name in ("steps", "n_samples", "n_iter", "repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UserError(f"--n_rows must be 0 (= n_samples) or more, got {args.n_rows}")
    if args.ddim_eta < 0:
        raise UserError(f"--ddim_eta must be 0 or more, got {args.ddim_eta}")
    if args.plms and args.ddim_eta != 0:
        raise UserError("PLMS is deterministic: use --ddim_eta 0 with --plms")
    if args.prompt is not None and args.from_file is not None:
        raise UserError("pass either --prompt or --from-file, not both")
    if args.from_file is not None and not Path(args.from_file).is_file():
        raise UserError(f"prompt file '{args.from_file}' does not exist")


def sampler_name(args):
    return "plms" if args.plms else "dpm" if args.dpm else "ddim"


def read_prompts(args):
    """One prompt (for a batch of n_samples) or the file's lines, each repeated ``--repeat``."""
    if args.from_file is None:
        return args.prompt if args.prompt is not None else DEFAULT_PROMPT
    try:
        text = Path(args.from_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file '{args.from_file}' ({err})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"prompt file '{args.from_file}' has no prompts")
    return [p for p in lines for _ in range(args.repeat)]


def check_latent_flags(args, model):
    """--C/--f only document the model's own values; anything else cannot work."""
    from ldm.generate import latent_channels, latent_factor
    for flag, given, actual in (("C", args.C, latent_channels(model)),
                                ("f", args.f, latent_factor(model))):
        if given is not None and given != actual:
            raise UserError(f"--{flag} {given} does not match the model ({flag}={actual}); "
                            f"leave it out")


def attention_options(args, environ=None):
    """(backend, upcast) from --attention and the official ATTN_PRECISION variable.

    ATTN_PRECISION=fp32 (the official default) computes attention logits in float32 under
    half-precision autocast, which SD 2.x v-models need; any other value (e.g. fp16) keeps them
    in the autocast dtype.
    """
    import os
    environ = os.environ if environ is None else environ
    backend = getattr(args, "attention", None) or "auto"
    if backend == "auto":
        from ldm.modules.attention import xformers_available
        backend = "xformers" if xformers_available() else "sdpa"
    return backend, environ.get("ATTN_PRECISION", "fp32") == "fp32"


def load_model_for(args):
    from ldm.checkpoint import load_model
    from ldm.modules.attention import set_attention_options
    # weights stay float32; --bf16 and --precision act through autocast, as officially
    model = load_model(args.config, args.ckpt, device=args.device)
    backend, upcast = attention_options(args)
    return set_attention_options(model, backend=backend, upcast=upcast)


def model_hash_for(args):
    from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, file_hash
    return file_hash(args.ckpt if args.ckpt else REPO_ROOT / DEFAULT_CKPT)


class Saver:
    """Saves each batch as it arrives (so an error later loses nothing) and the grid at the end."""

    def __init__(self, args, parameters):
        from ldm.image_io import make_watermarker
        self.outdir = Path(args.outdir)
        self.sample_dir = self.outdir / "samples"
        self.args = args
        self.parameters = parameters
        self.watermarker = make_watermarker(args.no_watermark)
        self.saved = []
        self.images = []

    def __call__(self, images, prompts):
        from ldm.image_io import save_samples
        self.images.extend(images)
        if not self.args.skip_save:
            infos = [dict(self.parameters, prompt=p, size=f"{im.width}x{im.height}")
                     for im, p in zip(images, prompts)]
            self.saved += save_samples(images, self.sample_dir, infos,
                                       watermarker=self.watermarker)

    def finish(self):
        """Write the grid; returns a one-line summary of where everything went."""
        from ldm.image_io import save_grid
        parts = []
        if self.saved:
            parts.append(f"{len(self.saved)} samples in {self.sample_dir}/")
        if not self.args.skip_grid and self.images:
            rows = self.args.n_rows or self.args.n_samples
            size = f"{self.images[0].width}x{self.images[0].height}"
            path = save_grid(self.images, self.outdir, rows, dict(self.parameters, size=size),
                             watermarker=self.watermarker)
            parts.append(f"grid {path}")
        return "outputs: " + ("; ".join(parts) if parts else "none saved (--skip_save --skip_grid)")

    def report_partial(self):
        if self.saved:
            print(f"kept {len(self.saved)} samples already saved in {self.sample_dir}/")


def setup_logging(verbose=False):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ldm").setLevel(logging.INFO if verbose else logging.WARNING)


def run(main_body, argv):
    """Call ``main_body(argv)``; a UserError becomes ``error: <message>`` on stderr and exit 2."""
    try:
        return main_body(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
