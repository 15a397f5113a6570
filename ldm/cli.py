"""What the sampling scripts share: flags, checks of impossible flag values, logging set-up,
saving as batches arrive, and turning a UserError into one ``error: ...`` line with exit code 2.
"""
import argparse
import logging
import sys
from pathlib import Path

from ldm.errors import UserError
from ldm.models.diffusion.samplers import (AUTOMATIC, DISPLAY_NAMES, SAMPLERS, SCHEDULE_LABELS, check_eta,
                                          resolve_sampler, resolve_schedule, sampler_label, schedule_for)

log = logging.getLogger(__name__)

# the official scripts' flags for two samplers (--sampler names them all)
SAMPLER_FLAGS = ("plms", "dpm")

EXIT_USER_ERROR = 2
DEFAULT_PROMPT = "a professional photograph of an astronaut riding a triceratops"
# Defaults when the flags are not given: the shipped shapes model was tuned for fewer steps and a
# lower guidance scale than the official checkpoints (see bench/shapes_fidelity.py).
SHIPPED_DEFAULTS = {"prompt": "a red circle on a white background", "steps": 15, "scale": 4.0, "sampler": "DDIM"}
OFFICIAL_DEFAULTS = {"prompt": DEFAULT_PROMPT, "steps": 50, "scale": 7.5, "sampler": "DDIM"}


def uses_shipped_model(ckpt=None, config=None):
    if ckpt is None and config is None:
        return True
    from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT
    return ckpt is not None and Path(ckpt).resolve() == (REPO_ROOT / DEFAULT_CKPT).resolve()


def default_scale(ckpt=None, config=None):
    return (SHIPPED_DEFAULTS if uses_shipped_model(ckpt, config) else OFFICIAL_DEFAULTS)["scale"]


def fill_model_defaults(args):
    """Fill --prompt/--steps/--scale left unset with the defaults of the model being used."""
    for name, value in model_defaults(args).items():
        if name == "sampler" or (name == "prompt" and getattr(args, "from_file", None) is not None):
            continue
        if getattr(args, name, None) is None:
            setattr(args, name, value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UserError (one line) instead of usage + exit."""

    def error(self, message):
        raise UserError(message)


def existing_file(what):
    """argparse ``type``: a path that must name an existing file (``what`` names it in the error)."""
    def check(path):
        if not Path(path).is_file():
            raise UserError(f"{what} '{path}' does not exist")
        return path
    return check


def number_in(flag, low, high=None, kind=float):
    """argparse ``type``: a ``kind`` number from ``low`` to ``high`` (no upper bound when None)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise UserError(f"{flag} takes a {'whole ' if kind is int else ''}number, got '{text}'") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise UserError(f"{flag} must be {allowed}, got {value}")
        return value
    return convert


def add_common_args(parser, outdir, *, size=False, fixed_code=False):
    """The flags every sampling script takes (official names; ``--steps`` also as ``--ddim_steps``).

    ``size``: ``--H``/``--W``; ``fixed_code``: ``--fixed_code``. README.md and docs/variants.md
    list the flags from the same split, and a test holds them to these parsers.
    """
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
    group.add_argument("--sampler", type=str, default=None,
                       help="sampler by its web-UI name, case-insensitive: " + ", ".join(
                           DISPLAY_NAMES[n] for n in SAMPLERS) + f" (default: {SHIPPED_DEFAULTS['sampler']} with the shipped "
                       f"model, {OFFICIAL_DEFAULTS['sampler']} otherwise)")
    for name in SAMPLER_FLAGS:   # the official scripts' spelling of two of them
        group.add_argument(f"--{name}", action="store_true", help=f"the same as --sampler {DISPLAY_NAMES[name]}")
    add("--schedule", type=str, default=None,
        help="sigma schedule of the Euler/DPM++/UniPC/... samplers: Automatic (the sampler's own), "
             + ", ".join(SCHEDULE_LABELS.values()))
    add("--spacing", choices=["leading", "trailing", "linspace"], default=None,
        help="DDIM/PLMS timesteps: leading (official), trailing (for zero-terminal-SNR models) or linspace")
    add("--guidance-rescale", type=number_in("--guidance-rescale", 0.0, 1.0), default=0.0,
        help="CFG rescale phi (Lin et al. 2023; 0.7 in the paper, 0 = plain guidance)")
    add("--emphasis", choices=["original", "no-norm", "none"], default="original",
        help="prompt weights as A1111 reads them: (word), (word:1.3), [word]; original restores the "
             "mean, no-norm only multiplies, none reads brackets as text")
    add("--clip-skip", type=number_in("--clip-skip", 1, kind=int), default=None,
        help="stop the text encoder N-1 layers early (1 = the config's layer)")
    add("--truncate-prompts", action="store_true",
        help="cut prompts at 75 tokens as the official scripts do (default: longer prompts are "
             "encoded in 75-token chunks)")
    add("--embeddings", type=str, default=None, metavar="DIR",
        help="textual-inversion embeddings (.pt, .bin, .safetensors, .png) in this folder; a file's "
             "name without its suffix is its trigger word in prompts")
    from ldm.cli_extra_networks import weighted_file_flag
    add("--lora", type=weighted_file_flag, action="append", default=None, metavar="FILE[:WEIGHT]",
        help="merge this LoRA file at WEIGHT (default 1) into the model; repeatable")
    add("--lora-dir", type=str, default=None, metavar="DIR",
        help="where the prompts' <lora:name>, <lora:name:weight>, <lora:name:te:unet> tags find their files")
    add("--hypernetwork", type=weighted_file_flag, action="append", default=None, metavar="FILE[:MULT]",
        help="apply this A1111 hypernetwork (.pt) at multiplier MULT (default 1); repeatable, chained in order")
    add("--hypernetwork-dir", type=str, default=None, metavar="DIR",
        help="where the prompts' <hypernet:name>, <hypernet:name:mult> tags find their name.pt files")
    add("--sigmas", type=str, default=None,
        help="the sigmas themselves, e.g. '14.6,7.0,3.1,0.5' (replaces --schedule and --steps)")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic; DDIM only)")
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
    # --force-bf16 sets bf16="force", the library's value for "even where it is emulated"
    bf16 = parser.add_mutually_exclusive_group()
    bf16.add_argument("--bf16", action="store_const", const=True, default="auto",
                      help="compute in bfloat16 on CUDA, or on a CPU with native bfloat16 "
                           "(AVX512-BF16/AMX); on other CPUs float32 runs instead, with a warning. "
                           "Default: bfloat16 autocast for full-size models on a CPU with native "
                           "bfloat16, float32 otherwise (--no-bf16, or --precision full, keeps float32)")
    bf16.add_argument("--no-bf16", dest="bf16", action="store_const", const=False,
                      help="float32 on the CPU even where bfloat16 is native")
    bf16.add_argument("--force-bf16", dest="bf16", action="store_const", const="force",
                      help="bfloat16 even on a CPU that emulates it (often 100x slower than "
                           "float32); also for configs with use_bf16")
    add("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    add("--skip_grid", action="store_true", help="do not save a grid")
    add("--skip_save", action="store_true", help="do not save individual samples")
    add("--no-watermark", action="store_true", help="do not embed the invisible watermark")
    add("--verbose", action="store_true", help="log details (keys ignored while loading, ...)")
    add("--trust-config", action="store_true",
        help="build any class the --config names; without it only ldm.*, torch.nn.* and Lightning "
             "callback/logger classes are built, since a config can run any code")
    add("--attention", choices=["auto", "sdpa", "xformers", "math"], default="auto",
        help="attention kernel (auto: xformers when installed and on CUDA, else PyTorch SDPA); "
             "ATTN_PRECISION=fp16 turns off the float32 attention used under float16 autocast, "
             "ATTN_PRECISION=fp32 turns it on under CPU bfloat16 autocast too")
    add("--vae-tiling", choices=["auto", "on", "off"], default="auto",
        help="decode (and encode) the image in overlapping 512px tiles, so large images need the "
             "memory of a 512px one (auto: only images larger than 768x768)")
    add("--vae-tiling-stats", choices=["image", "preview"], default="image",
        help="GroupNorm statistics of the tiles: of the whole image, from a first pass over every tile, or "
             "estimated from one run on the image shrunk to a tile (preview: half the time, statistics "
             "estimated; bench/README.md)")
    add("--winograd", type=number_in("--winograd", 0.0), default=None, metavar="GB",
        help="run the U-Net's 3x3 convolutions by Winograd's F(4x4, 3x3) when it samples in float32 on the "
             "CPU, caching at most GB of transformed filters, given to the largest feature maps first, and "
             "the autoencoder's with all of its filters cached (the same images to float32 rounding; pays on "
             "CPUs without AVX-512; 0 = off; default: off)")
    add_speedup_args(parser)
    if size:
        for flag, side in (("--H", "height"), ("--W", "width")):
            add(flag, type=int, default=None,
                help=f"image {side} in pixels (a multiple of 8; default: the model's native size)")
    if fixed_code:
        add("--fixed_code", action="store_true", help="reuse one start noise for every round")


def add_speedup_args(parser):
    """The opt-in approximate speed-ups (``ldm.modules.speedups``), off by default."""
    from ldm.modules.speedups import DEFAULT_DEPTH, MAX_RATIO
    add = parser.add_argument
    add("--deepcache", type=number_in("--deepcache", 0, kind=int), default=0, metavar="N",
        help="approximate: run the full U-Net every N sampling steps and only its shallow blocks with the "
             "deep features cached in between (DeepCache; 0 or 1 = off)")
    add("--deepcache-depth", type=number_in("--deepcache-depth", 0, kind=int), default=None, metavar="D",
        help=f"with --deepcache: input blocks 0..D (and their output-block partners) run every step "
             f"(default {DEFAULT_DEPTH})")
    add("--tome", type=number_in("--tome", 0.0, MAX_RATIO), default=0.0, metavar="RATIO",
        help=f"approximate: merge this share of the tokens before each self-attention at the finest "
             f"attention level (ToMe for SD; 0 = off, at most {MAX_RATIO})")
    add("--int8", action="store_true",
        help="approximate: int8 dynamic quantization of the U-Net's Linear layers (CPU only)")


def check_speedup_args(args):
    if args.deepcache_depth is not None and args.deepcache < 2:
        raise UserError("--deepcache-depth sets the branch of --deepcache N; pass --deepcache 2 or more with it")
    if args.int8 and args.device is not None and not args.device.startswith("cpu"):
        raise UserError(f"--int8 runs on the CPU only; drop it or pass --device cpu (got --device {args.device})")


def check_common_args(args):
    """Refuse impossible values before anything slow happens; returns ``args``."""
    fill_model_defaults(args)
    for name in ("steps", "n_samples", "n_iter", "repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UserError(f"--n_rows must be 0 (= n_samples) or more, got {args.n_rows}")
    resolve_sampler_flags(args)
    try:
        check_eta(args.sampler, args.ddim_eta)
    except UserError as err:
        raise UserError(f"--ddim_eta: {err}") from None
    for flag in ("H", "W"):
        value = getattr(args, flag, None)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} must be a positive multiple of 8, got {value}")
    outdir = Path(args.outdir)
    existing = next((p for p in (outdir, *outdir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == outdir else f"is inside '{existing}', which is a file"
        raise UserError(f"--outdir '{outdir}' {where}, not a folder; pass a folder to write into")
    if args.prompt is not None and args.from_file is not None:
        raise UserError("pass either --prompt or --from-file, not both")
    if args.from_file is not None and not Path(args.from_file).is_file():
        raise UserError(f"prompt file '{args.from_file}' does not exist")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise UserError(f"--embeddings '{args.embeddings}' is not a folder; pass the folder of embedding files")
    from ldm.cli_extra_networks import check_extra_network_flags
    check_extra_network_flags(args)
    check_speedup_args(args)
    return args


def shipped_sampling():
    """The scripts' sampling defaults for the shipped model as library keyword arguments: the sampler's id
    (from its web-UI name), the schedule that name implies (None: the sampler's own), steps and scale."""
    sampler, schedule = resolve_sampler(SHIPPED_DEFAULTS["sampler"])
    return {"sampler": sampler, "schedule": None if schedule == AUTOMATIC else schedule,
            "steps": SHIPPED_DEFAULTS["steps"], "scale": SHIPPED_DEFAULTS["scale"]}


def model_defaults(args):
    """The defaults of the model the flags name: the shipped model's, or the official scripts'."""
    return SHIPPED_DEFAULTS if uses_shipped_model(args.ckpt, args.config) else OFFICIAL_DEFAULTS


def resolve_sampler_flags(args):
    """Turn --sampler/--plms/--dpm, --schedule and --sigmas into the library's ids (in place); without
    a sampler flag, the model's default sampler."""
    sampler, combined_schedule = resolve_sampler(args.sampler or next(
        (name for name in SAMPLER_FLAGS if getattr(args, name, False)), model_defaults(args)["sampler"]))
    schedule = resolve_schedule(args.schedule) if args.schedule is not None else combined_schedule
    schedule = None if schedule == AUTOMATIC else schedule
    if args.sigmas is not None:
        from ldm.models.diffusion.k_sampling import sigmas_from_list
        try:
            sigmas_from_list(args.sigmas)
        except UserError as err:
            raise UserError(f"--sigmas: {err}") from None
        if schedule is not None:
            raise UserError("pass either --schedule or --sigmas, not both")
    try:
        schedule_for(sampler, schedule, args.sigmas)
    except UserError as err:
        raise UserError(f"--schedule/--sigmas: {err}") from None
    if args.spacing is not None and sampler not in ("ddim", "plms"):
        raise UserError(f"--spacing sets DDIM/PLMS timesteps; {DISPLAY_NAMES[sampler]} does not take it")
    args.sampler, args.schedule = sampler, schedule
    return args



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

    Unset: what the official code's default (fp32) computes, attention in float32 under float16
    autocast (SD 2.x v-models need it) and in bfloat16 under a CPU bfloat16 autocast (the official
    code switches off only CUDA's autocast for it); ATTN_PRECISION=fp32 also upcasts the latter,
    any other value (e.g. fp16) keeps attention in the autocast dtype everywhere.
    """
    import os
    environ = os.environ if environ is None else environ
    backend = getattr(args, "attention", None) or "auto"
    if backend == "auto":
        from ldm.modules.attention import xformers_available
        backend = "xformers" if xformers_available() else "sdpa"
    from ldm.modules.attention import UPCAST_AUTO
    precision = environ.get("ATTN_PRECISION")
    return backend, UPCAST_AUTO if precision is None else precision == "fp32"


TRUST_CONFIG_ADVICE = "pass --trust-config if you trust this config"


def load_model_for(args):
    from ldm.checkpoint import load_model
    from ldm.config_safety import UntrustedConfigError
    from ldm.modules.attention import set_attention_options
    # weights stay float32 (or the config's use_bf16 U-Net); --bf16 and --precision act through
    # autocast, as officially; --force-bf16 also keeps use_bf16 on a CPU that emulates it
    force_bf16 = getattr(args, "bf16", False) == "force"
    try:
        model = load_model(args.config, args.ckpt, device=args.device, force_dtype=force_bf16,
                           trust_config=getattr(args, "trust_config", False))
    except UntrustedConfigError as err:
        raise err.advise(TRUST_CONFIG_ADVICE) from None
    backend, upcast = attention_options(args)
    return set_attention_options(model, backend=backend, upcast=upcast)


def model_hash_for(args):
    from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, file_hash
    return file_hash(args.ckpt if args.ckpt else REPO_ROOT / DEFAULT_CKPT)


def generation_kwargs(args):
    """The library arguments every generation function takes, from the common flags."""
    return dict(negative_prompt=args.negative_prompt, sampler=args.sampler, schedule=args.schedule,
                sigmas=args.sigmas, steps=args.steps, scale=args.scale, eta=args.ddim_eta, seed=args.seed,
                n_samples=args.n_samples, n_iter=args.n_iter, precision=args.precision, bf16=args.bf16,
                emphasis=args.emphasis, truncate=args.truncate_prompts, clip_skip=args.clip_skip,
                timestep_spacing=args.spacing, guidance_rescale=args.guidance_rescale,
                vae_tiling=args.vae_tiling, vae_tiling_stats=args.vae_tiling_stats, **speedup_kwargs(args))


def speedup_kwargs(args):
    return dict(deepcache=args.deepcache, deepcache_depth=args.deepcache_depth, tome=args.tome, int8=args.int8)


def image_parameters(args, **extra):
    """What each PNG's ``parameters`` text records (prompt and size are added per image)."""
    from ldm.generate import Sampling, sampled_steps
    from ldm.modules.speedups import recorded_settings
    sampler, schedule = sampler_label(args.sampler, args.schedule, args.sigmas)
    steps = sampled_steps(Sampling(steps=args.steps, sigmas=args.sigmas))
    return dict(negative_prompt=args.negative_prompt, steps=steps, sampler=sampler, schedule=schedule,
                scale=args.scale, seed=args.seed, model_hash=model_hash_for(args),
                eta=args.ddim_eta or None, clip_skip=args.clip_skip if (args.clip_skip or 1) > 1 else None,
                spacing=args.spacing, guidance_rescale=args.guidance_rescale or None,
                lora_hashes=getattr(args, "lora_hashes", None), hypernet=getattr(args, "hypernet", None),
                hypernet_hash=getattr(args, "hypernet_hash", None),
                hypernet_strength=getattr(args, "hypernet_strength", None), vae_tiling=args.vae_tiling,
                vae_tiling_stats=args.vae_tiling_stats if args.vae_tiling_stats != "image" else None,
                **recorded_settings(**speedup_kwargs(args)), **extra)


def prepare(args, load=None):
    """(model, prompts): logging set up, prompts read and the model loaded (by ``load(args)``, default
    :func:`load_model_for`) and checked against the flags, as every sampling script does before generating."""
    setup_logging(args.verbose)
    prompts = read_prompts(args)
    model = (load or load_model_for)(args)
    check_latent_flags(args, model)
    if args.embeddings is not None:
        from ldm.modules.encoders.embeddings import use_embeddings
        use_embeddings(model, args.embeddings)
    from ldm.cli_extra_networks import take_extra_networks
    prompts = take_extra_networks(args, model, prompts)
    hold_denoiser_weights_for_autocast(args, model)
    use_winograd_for(args, model)
    if args.spacing is None:   # recorded as used: a zero-terminal-SNR model samples DDIM/PLMS on trailing steps
        from ldm.generate import Sampling, timestep_spacing
        args.spacing = timestep_spacing(model, Sampling(sampler=args.sampler))
    return model, prompts


def sampling_unet(args, model):
    """(the U-Net of ``model`` or None, the autocast dtype it samples under with these flags or None)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None:
        return None, None
    from ldm.generate import denoiser_size
    from ldm.precision import autocast_dtype
    device = next(unet.parameters()).device
    return unet, autocast_dtype(device, args.precision, args.bf16, parameters=denoiser_size(model))


def hold_denoiser_weights_for_autocast(args, model):
    """Where the run samples under bfloat16 autocast on the CPU (the default for full-size models on a CPU
    with native bfloat16), hold the U-Net's convolution and linear weights in bfloat16
    (``ldm.precision.hold_weights_in``): the same images, and neither the U-Net's float32 weights nor
    autocast's cached bfloat16 copy of them in memory; the other weights stop requiring grad, so
    autocast does not cache copies of them either. Not with ``--int8`` (it quantizes float32 weights),
    LoRAs (merged into float32 weights) or hypernetworks (float32 context), whose results would round
    differently."""
    if getattr(args, "int8", False) or getattr(args, "lora_merger", None) is not None \
            or getattr(args, "hypernetwork_hooks", None) is not None:
        return
    unet, autocast = sampling_unet(args, model)
    import torch

    from ldm.precision import hold_weights_in
    if unet is None or next(unet.parameters()).device.type != "cpu" or autocast != torch.bfloat16:
        return
    freed = hold_weights_in(unet, torch.bfloat16)
    # autocast caches its cast copy of every weight that requires grad for the whole run (the text
    # encoder's: 0.7 GB for SD 2.x); the rest runs once or twice a run, so casting it each time costs little
    model.requires_grad_(False)
    log.info("U-Net convolution and linear weights held in bfloat16 for its autocast (%.2f GB less)", freed / 1e9)


def use_winograd_for(args, model):
    """With ``--winograd GB``, where the U-Net samples in float32 on the CPU, its 3x3 convolutions by
    Winograd's F(4x4, 3x3) (``ldm.modules.winograd``) with at most GB of transformed filters cached, and the
    autoencoder's with all of its cached (0.75 GB for the SD VAE's decoder: a script decodes once or twice,
    too few calls to plan a budget on)."""
    budget_gb = getattr(args, "winograd", None)
    if not budget_gb:
        return
    unet, autocast = sampling_unet(args, model)
    if unet is None:
        return
    import torch

    from ldm.modules.winograd import use_winograd
    weight = next(unet.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or autocast is not None:
        log.warning("--winograd: the U-Net does not sample in float32 on the CPU here, so it is not used")
        return
    use_winograd(unet, budget_bytes=int(budget_gb * 1e9))
    autoencoder = getattr(model, "first_stage_model", None)
    if autoencoder is not None:
        use_winograd(autoencoder, budget_bytes=float("inf"))


def generate_and_save(args, generate, saver_class=None, **parameters):
    """Call ``generate(on_batch, **generation_kwargs(args))`` saving each batch as it arrives, then
    the grid; print where the outputs went. ``parameters`` are extra PNG metadata (strength, ...)."""
    saver = (saver_class or Saver)(args, image_parameters(args, **parameters))
    try:
        generate(saver, **generation_kwargs(args))
    except BaseException:
        saver.report_partial()
        raise
    finally:
        from ldm.cli_extra_networks import remove_extra_networks
        remove_extra_networks(args)  # the model's own weights and attention back, bit for bit
    print(saver.finish())
    return 0


class Saver:
    """Saves each batch as it arrives (so an error later loses nothing) and the grid at the end."""

    def __init__(self, args, parameters):
        from ldm.image_io import ensure_folder, make_watermarker
        self.outdir = Path(args.outdir)
        self.sample_dir = self.outdir / "samples"
        self.args = args
        self.parameters = parameters
        self.watermarker = make_watermarker(args.no_watermark)
        # created before sampling, so that an unwritable folder fails before the slow part
        ensure_folder(self.outdir if args.skip_save else self.sample_dir)
        self.saved = []
        self.images = []
        self.prompts = []

    def __call__(self, images, prompts):
        from ldm.image_io import save_samples
        self.images.extend(images)
        self.prompts.extend(prompts)
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
            # the prompts the grid shows, each once, one per line
            prompt = "\n".join(dict.fromkeys(self.prompts))
            path = save_grid(self.images, self.outdir, rows, dict(self.parameters, prompt=prompt, size=size),
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
