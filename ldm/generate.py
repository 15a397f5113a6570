"""Sampling library API: text-to-image and image-to-image on a loaded latent diffusion model.

These follow the official scripts' order of random draws, so with the same seed, sampler and
settings they reproduce the official images on CUDA. (The official scripts seed *before* building
the model, whose random initialisation then uses up CPU random numbers; we seed right before
sampling, which only matches the official images where the start noise is drawn on the GPU.)
"""
import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.image_io import images_to_tensor, tensor_to_images
from ldm.models.diffusion.samplers import SAMPLERS, check_eta, check_sampler, check_strength, schedule_for  # noqa: F401
from ldm.models.diffusion.samplers import make_sampler as _make_sampler
from ldm.models.tiled_vae import check_mode as check_vae_tiling
from ldm.models.tiled_vae import check_stats as check_vae_tiling_stats
from ldm.models.tiled_vae import first_stage_settings
from ldm.modules.speedups import approximated, check_approximations

log = logging.getLogger(__name__)

MAX_SEED = 2 ** 32 - 1


def make_sampler(name, model, **schedule):
    """The sampler called ``name`` (see ``SAMPLERS``) for ``model``, on the model's device;
    ``schedule``/``sigmas`` for the samplers of the sigma formulation."""
    return _make_sampler(name, model, device=model_device(model), **schedule)


# ---------------------------------------------------------------------------------------------
# model facts

def model_device(model):
    return next(model.parameters()).device


def latent_factor(model):
    """Pixels per latent pixel: 2 ** (number of autoencoder resolutions - 1)."""
    encoder = model.first_stage_model.encoder
    return 2 ** (encoder.num_resolutions - 1)


def latent_channels(model):
    return model.channels


def native_size(model):
    """(H, W) in pixels the model was trained at."""
    size = model.image_size * latent_factor(model)
    return size, size


# ---------------------------------------------------------------------------------------------
# shared pieces

def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) like the official scripts do."""
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed {seed!r} is out of range; use a whole number from 0 to {MAX_SEED}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision_scope(device, precision="autocast", bf16=False, parameters=None):
    """Autocast as the official scripts use it: float16 on CUDA, bfloat16 when ``bf16`` is set,
    plain float32 otherwise. On a CPU without native bfloat16, ``bf16=True`` runs float32 with a
    warning (emulated bfloat16 is often 100x slower) and ``bf16="force"`` runs bfloat16 anyway;
    the decision is ``ldm.precision.autocast_dtype`` (``bf16="auto"`` decides by the CPU and the
    denoiser's ``parameters``)."""
    from ldm.precision import autocast_dtype
    dtype = autocast_dtype(device, precision, bf16, parameters=parameters)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def batches(prompts, n_samples):
    """A prompt string makes one batch of ``n_samples`` copies; a list is cut into batches of
    ``n_samples`` (the last may be shorter)."""
    if isinstance(prompts, str):
        return [[prompts] * n_samples]
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts given: pass a prompt string or a non-empty list of prompts")
    return [prompts[i:i + n_samples] for i in range(0, len(prompts), n_samples)]


def check_settings(model, *, sampler, steps, scale, eta, n_samples, n_iter, schedule=None, sigmas=None):
    check_sampler(sampler)
    schedule_for(sampler, schedule, sigmas)
    if not isinstance(steps, int) or not 1 <= steps <= model.num_timesteps:
        raise UserError(f"steps must be from 1 to {model.num_timesteps}, got {steps}")
    if n_samples < 1 or n_iter < 1:
        raise UserError(f"n_samples and n_iter must be at least 1, got {n_samples} and {n_iter}")
    check_eta(sampler, eta)
    if not np.isfinite(scale):
        raise UserError(f"guidance scale must be a finite number, got {scale}")


def text_conditioning(model, prompts, sampling, strength=None):
    """(cond, uncond) of a batch's prompts; uncond only when guidance is on (scale != 1), as officially.
    ``strength``: the img2img strength, which sets how many steps prompt editing spreads over."""
    from ldm.conditioning import text_conditioning as encode
    return encode(model, list(prompts), sampling.negative_prompt, prompt_options(model, sampling, strength),
                  with_uncond=sampling.scale != 1.0)


def _decode(model, z):
    x = model.decode_first_stage(z)
    return tensor_to_images(torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0))


def denoiser_size(model):
    """Parameters of ``model``'s denoiser (the part every sampling step runs), for ``bf16="auto"``."""
    denoiser = getattr(model, "model", model)
    return sum(p.numel() for p in denoiser.parameters())


def ema_weights(model):
    scope = getattr(model, "ema_scope", None)
    return scope() if scope is not None else nullcontext()


def checked_device(model, device):
    own = model_device(model)
    if device is not None and torch.device(device).type != own.type:
        raise UserError(f"the model is on {own} but {device} was asked for; load it there")
    return own


# ---------------------------------------------------------------------------------------------
# the loop every generation function shares

@dataclass
class Sampling:
    """The settings every generation function takes as keyword arguments.

    ``negative_prompt`` is the unconditional side of guidance; ``sampler`` a name from
    ``SAMPLERS``; ``eta`` DDIM's noise (0 = deterministic); ``precision``/``bf16`` the autocast
    (see ``precision_scope``); ``on_batch(images, prompts)`` is called as each batch finishes, so
    callers can save as they go.
    """
    negative_prompt: str = ""
    sampler: str = "ddim"
    schedule: object = None     # a sigma schedule name (sigma samplers only; None = the sampler's own)
    sigmas: object = None       # or the sigmas themselves ("14.6,7.0,..." or numbers)
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    seed: int = 42
    n_samples: int = 1
    n_iter: int = 1
    precision: str = "autocast"
    bf16: object = False
    device: object = None
    progress: bool = True
    on_batch: object = None
    # DDIM/PLMS timesteps: "leading" (official), "trailing" or "linspace"; None = the sampler's own
    timestep_spacing: object = None
    # CFG rescale (Lin et al. 2023): 0 = plain guidance, 0.7 as in the paper
    guidance_rescale: float = 0.0
    # how the text encoder reads prompts (A1111's defaults: emphasis weights, no 75-token cut)
    emphasis: str = "original"
    truncate: bool = False
    clip_skip: object = None
    # VAE tiling of decode (and img2img's encode): "auto" tiles only images larger than 768x768,
    # "on" any image larger than one tile, "off" never (see ldm.models.tiled_vae; the VAE also runs
    # in the channels_last layout there, 0.87x the time)
    vae_tiling: str = "auto"
    # the tiles' GroupNorm statistics: "image" (a first pass over every tile) or "preview" (one run on
    # the input shrunk to a tile: half the time of a 1024px tiled decode, statistics estimated)
    vae_tiling_stats: str = "image"
    # opt-in approximate speed-ups, off by default (see ldm.modules.speedups): a full U-Net every
    # ``deepcache`` steps (0/1: off) at branch ``deepcache_depth`` (None: its default), ``tome`` of the
    # tokens merged before self-attention (0: off), ``int8`` quantized Linear layers
    deepcache: int = 0
    deepcache_depth: object = None
    tome: float = 0.0
    int8: bool = False


def sampled_steps(sampling, strength=None):
    """How many steps the sampler runs: ``steps`` (or the user's sigmas), of which img2img's
    ``strength`` runs the last int(strength * n); at least 1."""
    n = sampling.steps
    if sampling.sigmas is not None:
        from ldm.models.diffusion.k_sampling import sigmas_from_list
        n = len(sigmas_from_list(sampling.sigmas)) - 1
    if strength is not None:
        n = int(strength * n)
    return max(n, 1)


def prompt_options(model, sampling, strength=None):
    """How ``model``'s text encoder reads the prompts of ``sampling``: emphasis, truncation, clip skip,
    and ``steps``, the sampled steps that prompt editing ``[from:to:when]`` and alternation ``[a|b]``
    spread over (see ``sampled_steps``). None for an encoder that reads no prompt syntax (class
    labels, ...), which then refuses a clip skip."""
    from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
    if not isinstance(getattr(model, "cond_stage_model", None), ChunkedTextEncoder):
        if sampling.clip_skip not in (None, 1):
            raise UserError(f"clip skip needs a text encoder; this model's conditioning is "
                            f"{type(getattr(model, 'cond_stage_model', None)).__name__}")
        return {}
    return dict(emphasis=sampling.emphasis, truncate=sampling.truncate, clip_skip=sampling.clip_skip,
                steps=sampled_steps(sampling, strength))


def run_generation(model, prompts, sampling, make_batch, setup=None):
    """Check ``sampling``, seed, and run ``make_batch`` for every batch of every round.

    Inside no-grad, the precision scope and the EMA weights, ``setup(sampler)`` runs once (its
    result is ``state``), then ``make_batch(sampler, prompts_of_batch, state)`` returns each
    batch's images, which go to ``on_batch`` and into the returned list (round, batch, sample).
    """
    check_settings(model, sampler=sampling.sampler, steps=sampling.steps, scale=sampling.scale,
                   eta=sampling.eta, n_samples=sampling.n_samples, n_iter=sampling.n_iter,
                   schedule=sampling.schedule, sigmas=sampling.sigmas)
    check_vae_tiling(sampling.vae_tiling)
    check_vae_tiling_stats(sampling.vae_tiling_stats)
    check_approximations(sampling.deepcache, sampling.deepcache_depth, sampling.tome, sampling.int8)
    device = checked_device(model, sampling.device)
    data = batches(prompts, sampling.n_samples)
    sampler = make_sampler(sampling.sampler, model, schedule=sampling.schedule, sigmas=sampling.sigmas)
    seed_everything(sampling.seed)
    images = []
    # innermost: int8 quantizes the weights in use (EMA's, when it swaps them in)
    speedups = approximated(model, deepcache=sampling.deepcache, deepcache_depth=sampling.deepcache_depth,
                            tome=sampling.tome, int8=sampling.int8)
    with torch.no_grad(), precision_scope(device, sampling.precision, sampling.bf16, denoiser_size(model)), \
            ema_weights(model), \
            first_stage_settings(model, sampling.vae_tiling, channels_last=True,
                                 stats=sampling.vae_tiling_stats), speedups:
        state = setup(sampler) if setup is not None else None
        for _ in range(sampling.n_iter):
            for batch in data:
                batch_images = make_batch(sampler, batch, state)
                if sampling.on_batch is not None:
                    sampling.on_batch(batch_images, batch)
                images.extend(batch_images)
    return images


def max_batch(prompts, n_samples):
    return max(len(b) for b in batches(prompts, n_samples))


def timestep_spacing(model, sampling):
    """DDIM/PLMS timesteps: the asked spacing; else "trailing" for a zero-terminal-SNR model, whose
    last timestep is the only pure-noise one (Lin et al. 2023, sec. 3.3), and None (the sampler's
    own, official "leading") for the others."""
    if sampling.timestep_spacing is not None or sampling.sampler not in ("ddim", "plms"):
        return sampling.timestep_spacing
    from ldm.models.diffusion.schedule import has_zero_terminal_snr
    return "trailing" if has_zero_terminal_snr(model.alphas_cumprod) else None


def _schedule_options(sampling, model):
    """Sampler options that are passed only when set, so a sampler without them never sees them."""
    options = {}
    spacing = timestep_spacing(model, sampling)
    if spacing is not None:
        options["timestep_spacing"] = spacing
    if sampling.guidance_rescale:
        options["guidance_rescale"] = sampling.guidance_rescale
    return options


def sample(sampler, sampling, cond, uncond, shape, **extra):
    """One guided sampling run of ``sampler`` from noise (``x_T`` and blending in ``extra``)."""
    extra = {**_schedule_options(sampling, sampler.model), **extra}
    samples, _ = sampler.sample(S=sampling.steps, conditioning=cond, batch_size=shape[0],
                                shape=list(shape[1:]), verbose=False, eta=sampling.eta,
                                unconditional_guidance_scale=sampling.scale,
                                unconditional_conditioning=uncond if sampling.scale != 1.0 else None,
                                progress=sampling.progress, **extra)
    return samples


def sample_from_latent(sampler, sampling, init_latent, strength, cond, uncond):
    """Noise ``init_latent`` to ``strength`` of the schedule (0 keeps it, 1 is pure noise) and
    denoise the rest of the way: the img2img partial schedule. The sigma samplers and DPM-Solver++
    have their own ``sample_img2img``; DDIM and PLMS noise to a DDIM step and ``decode`` from there."""
    steps, n = sampling.steps, init_latent.shape[0]
    uncond = uncond if sampling.scale != 1.0 else None
    options = _schedule_options(sampling, sampler.model)
    if hasattr(sampler, "sample_img2img"):
        return sampler.sample_img2img(steps, init_latent, strength, cond, unconditional_guidance_scale=sampling.scale,
                                      unconditional_conditioning=uncond, progress=sampling.progress, **options)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=sampling.eta, verbose=False,
                          timestep_spacing=options.pop("timestep_spacing", None))
    t_enc = int(strength * steps)
    # the official script indexes past the schedule at strength 1.0 and crashes; noising to the
    # last DDIM step instead keeps every other strength as it was
    z_enc = sampler.stochastic_encode(init_latent, torch.tensor([min(t_enc, steps - 1)] * n,
                                                                device=init_latent.device))
    return sampler.decode(z_enc, cond, t_enc, unconditional_guidance_scale=sampling.scale,
                          unconditional_conditioning=uncond, progress=sampling.progress, **options)


def encode_image(model, image, n):
    """Latents [n, C, h, w] of a PIL image, each copy with its own posterior draw (as the official
    scripts encode the repeated image)."""
    x = images_to_tensor([image] * n).to(device=model_device(model), dtype=model_dtype(model))
    return model.get_first_stage_encoding(model.encode_first_stage(x))


# ---------------------------------------------------------------------------------------------
# text to image

def txt2img(model, prompts, *, H=None, W=None, fixed_code=False, conditioning=None, **sampling):
    """Generate images from text; returns them in order (round, then batch, then sample).

    ``prompts``: one string (``n_samples`` images per round) or a list cut into batches of
    ``n_samples``. ``fixed_code`` draws one start noise and reuses it every round.
    ``conditioning(cond, uncond, n)`` -> (cond, uncond) turns each batch's text conditioning into
    what the model takes (ControlNet adds its hints: ``cldm.generate``). The other keyword
    arguments are :class:`Sampling`'s.
    """
    sampling = Sampling(**sampling)
    f, C = latent_factor(model), latent_channels(model)
    native_h, native_w = native_size(model)
    H, W = H or native_h, W or native_w
    multiple = max(8, f)
    if H % multiple or W % multiple or H <= 0 or W <= 0:
        raise UserError(f"height and width must be positive multiples of {multiple}, got {H}x{W}")
    shape = [C, H // f, W // f]

    def setup(sampler):
        if fixed_code:
            return torch.randn([sampling.n_samples, *shape], device=model_device(model))
        return None

    def make_batch(sampler, batch, start_code):
        c, uc = text_conditioning(model, batch, sampling)
        if conditioning is not None:
            c, uc = conditioning(c, uc, len(batch))
        x_T = None if start_code is None else start_code[:len(batch)]
        return _decode(model, sample(sampler, sampling, c, uc, [len(batch), *shape], x_T=x_T))

    return run_generation(model, prompts, sampling, make_batch, setup)


# ---------------------------------------------------------------------------------------------
# image to image

def resize_to_multiple(image, multiple=64):
    """Shrink each side down to a multiple of ``multiple`` (Lanczos), as the official script does."""
    w, h = image.size
    new_w, new_h = w - w % multiple, h - h % multiple
    if new_w == 0 or new_h == 0:
        raise UserError(f"init image is {w}x{h}; it must be at least {multiple}x{multiple} pixels")
    if (new_w, new_h) != (w, h):
        log.warning("init image resized from %dx%d to %dx%d (a multiple of %d)",
                    w, h, new_w, new_h, multiple)
        image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    return image


def img2img(model, init_image, prompts, *, strength=0.75, **sampling):
    """Re-draw ``init_image`` (PIL) guided by text: noise it to ``strength`` of the schedule
    (0 keeps it, 1 starts from pure noise), then denoise. Other arguments: :class:`Sampling`."""
    sampling = Sampling(**sampling)
    check_strength(strength)
    init_image = resize_to_multiple(init_image.convert("RGB"), 64)
    log.info("img2img: %d of %d steps (strength %.2f)", int(strength * sampling.steps), sampling.steps,
             strength)

    def setup(sampler):
        return encode_image(model, init_image, max_batch(prompts, sampling.n_samples))

    def make_batch(sampler, batch, init_latent):
        c, uc = text_conditioning(model, batch, sampling, strength)
        return _decode(model, sample_from_latent(sampler, sampling, init_latent[:len(batch)], strength, c, uc))

    return run_generation(model, prompts, sampling, make_batch, setup)


def model_dtype(model):
    return model.first_stage_model.encoder.conv_in.weight.dtype
