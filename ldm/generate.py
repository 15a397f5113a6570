"""Sampling library API: text-to-image and image-to-image on a loaded latent diffusion model.

These follow the official scripts' order of random draws, so with the same seed, sampler and
settings they reproduce the official images on CUDA. (The official scripts seed *before* building
the model, whose random initialisation then uses up CPU random numbers; we seed right before
sampling, which only matches the official images where the start noise is drawn on the GPU.)
"""
import logging
import random
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.image_io import images_to_tensor, tensor_to_images
from ldm.models.diffusion.samplers import SAMPLERS, check_eta, check_sampler  # noqa: F401 (re-exported)
from ldm.models.diffusion.samplers import make_sampler as _make_sampler

log = logging.getLogger(__name__)

MAX_SEED = 2 ** 32 - 1


def make_sampler(name, model):
    """The sampler called ``name`` (see ``SAMPLERS``) for ``model``, on the model's device."""
    return _make_sampler(name, model, device=model_device(model))


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


def precision_scope(device, precision="autocast", bf16=False):
    """Autocast as the official scripts use it: float16 on CUDA, bfloat16 when ``bf16`` is set,
    plain float32 otherwise. On a CPU without native bfloat16, ``bf16=True`` runs float32 with a
    warning (emulated bfloat16 is often 100x slower) and ``bf16="force"`` runs bfloat16 anyway;
    the decision is ``ldm.precision.autocast_dtype``."""
    from ldm.precision import autocast_dtype
    dtype = autocast_dtype(device, precision, bf16)
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


def check_settings(model, *, sampler, steps, scale, eta, n_samples, n_iter):
    check_sampler(sampler)
    if not isinstance(steps, int) or not 1 <= steps <= model.num_timesteps:
        raise UserError(f"steps must be from 1 to {model.num_timesteps}, got {steps}")
    if n_samples < 1 or n_iter < 1:
        raise UserError(f"n_samples and n_iter must be at least 1, got {n_samples} and {n_iter}")
    check_eta(sampler, eta)
    if not np.isfinite(scale):
        raise UserError(f"guidance scale must be a finite number, got {scale}")


def text_conditioning(model, prompts, negative_prompt, scale):
    """(cond, uncond); uncond only when guidance is on (scale != 1), as officially."""
    uc = None
    if scale != 1.0:
        uc = model.get_learned_conditioning(len(prompts) * [negative_prompt or ""])
    return model.get_learned_conditioning(list(prompts)), uc


def _decode(model, z):
    x = model.decode_first_stage(z)
    return tensor_to_images(torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0))


def ema_weights(model):
    scope = getattr(model, "ema_scope", None)
    return scope() if scope is not None else nullcontext()


def checked_device(model, device):
    own = model_device(model)
    if device is not None and torch.device(device).type != own.type:
        raise UserError(f"the model is on {own} but {device} was asked for; load it there")
    return own


# ---------------------------------------------------------------------------------------------
# text to image

def txt2img(model, prompts, *, negative_prompt="", sampler="ddim", steps=50, scale=7.5, eta=0.0,
            H=None, W=None, seed=42, n_samples=1, n_iter=1, fixed_code=False,
            precision="autocast", bf16=False, device=None, progress=True, on_batch=None):
    """Generate images from text; returns them in order (iteration, then batch, then sample).

    ``prompts``: one string (``n_samples`` images per iteration) or a list cut into batches of
    ``n_samples``. ``on_batch(images, prompts)`` is called after each batch so callers can save
    as they go. ``fixed_code`` draws one start noise and reuses it every iteration.
    """
    check_settings(model, sampler=sampler, steps=steps, scale=scale, eta=eta,
                   n_samples=n_samples, n_iter=n_iter)
    device = checked_device(model, device)
    f, C = latent_factor(model), latent_channels(model)
    native_h, native_w = native_size(model)
    H, W = H or native_h, W or native_w
    multiple = max(8, f)
    if H % multiple or W % multiple or H <= 0 or W <= 0:
        raise UserError(f"height and width must be positive multiples of {multiple}, got {H}x{W}")
    data = batches(prompts, n_samples)
    sampler_obj = make_sampler(sampler, model)
    shape = [C, H // f, W // f]

    seed_everything(seed)
    start_code = None
    if fixed_code:
        start_code = torch.randn([n_samples, *shape], device=device)

    images = []
    with torch.no_grad(), precision_scope(device, precision, bf16), ema_weights(model):
        for _ in range(n_iter):
            for batch in data:
                c, uc = text_conditioning(model, batch, negative_prompt, scale)
                samples, _ = sampler_obj.sample(
                    S=steps, conditioning=c, batch_size=len(batch), shape=shape, verbose=False,
                    unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=eta,
                    x_T=None if start_code is None else start_code[:len(batch)],
                    progress=progress)
                batch_images = _decode(model, samples)
                if on_batch is not None:
                    on_batch(batch_images, batch)
                images.extend(batch_images)
    return images


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


def img2img(model, init_image, prompts, *, strength=0.75, negative_prompt="", sampler="ddim",
            steps=50, scale=7.5, eta=0.0, seed=42, n_samples=1, n_iter=1, precision="autocast",
            bf16=False, device=None, progress=True, on_batch=None):
    """Re-draw ``init_image`` (PIL) guided by text: noise it to ``strength`` of the DDIM schedule
    (0 keeps it, 1 starts from pure noise), then denoise. DDIM only, as officially."""
    if sampler != "ddim":
        raise UserError(f"img2img works with the DDIM sampler only, not '{sampler}'")
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be from 0.0 to 1.0, got {strength}")
    check_settings(model, sampler=sampler, steps=steps, scale=scale, eta=eta,
                   n_samples=n_samples, n_iter=n_iter)
    device = checked_device(model, device)
    init_image = resize_to_multiple(init_image.convert("RGB"), 64)
    data = batches(prompts, n_samples)
    batch_size = max(len(b) for b in data)
    sampler_obj = make_sampler("ddim", model)

    seed_everything(seed)
    images = []
    with torch.no_grad(), precision_scope(device, precision, bf16), ema_weights(model):
        # the official script encodes the repeated image, so each copy gets its own posterior draw
        init = images_to_tensor([init_image] * batch_size).to(device=device, dtype=model_dtype(model))
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(init))
        sampler_obj.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
        t_enc = int(strength * steps)
        log.info("img2img: %d of %d DDIM steps (strength %.2f)", t_enc, steps, strength)
        for _ in range(n_iter):
            for batch in data:
                c, uc = text_conditioning(model, batch, negative_prompt, scale)
                n = len(batch)
                # the official script indexes past the schedule at strength 1.0 and crashes;
                # noising to the last DDIM step instead keeps every other strength as it was
                z_enc = sampler_obj.stochastic_encode(
                    init_latent[:n], torch.tensor([min(t_enc, steps - 1)] * n, device=device))
                samples = sampler_obj.decode(z_enc, c, t_enc, unconditional_guidance_scale=scale,
                                             unconditional_conditioning=uc, progress=progress)
                batch_images = _decode(model, samples)
                if on_batch is not None:
                    on_batch(batch_images, batch)
                images.extend(batch_images)
    return images


def model_dtype(model):
    return model.first_stage_model.encoder.conv_in.weight.dtype
