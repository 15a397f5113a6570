"""Conditioning for the image-conditioned SD 2 models, as their official sampling scripts build it.

Each builder returns a :class:`Conditioning`: the conditional and unconditional dicts the samplers
take (``conditioning=`` / ``unconditional_conditioning=``), the latent shape to sample, and
by-products worth showing (e.g. the depth map). Images are PIL images or [B, 3, H, W] tensors in
[-1, 1]; masks are PIL images or [B, 1, H, W] tensors in [0, 1]. A batch of one is repeated to
the number of prompts.

    inpaint_conditioning   image + mask      -> c_concat [mask, masked-image latent]
    depth_conditioning     image (or depth)  -> c_concat [depth at latent size]
    upscale_conditioning   low-res image     -> c_concat [noised low-res], c_adm [noise level]
    unclip_conditioning    image (or embed.) -> c_adm [noised CLIP embedding, level embedding]

The unconditional side keeps every image conditioning and swaps the text for the negative prompt,
except unCLIP, whose unconditional image embedding is zero (as in the official scripts).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm.errors import UserError


@dataclass
class Conditioning:
    cond: dict
    uncond: dict
    shape: tuple          # (C, h, w) of the latent to sample
    extras: dict = field(default_factory=dict)


def model_device(model):
    return next(model.parameters()).device


def vae_factor(model):
    """Pixels per latent pixel."""
    return 2 ** (model.first_stage_model.encoder.num_resolutions - 1)


def unet_multiple(model):
    """Latent sides must be multiples of this for the U-Net's down/upsampling to line up."""
    return 2 ** (len(model.model.diffusion_model.channel_mult) - 1)


def as_image_batch(image, batch_size, name="image"):
    """PIL image or [B|1, 3, H, W] tensor in [-1, 1] -> float tensor [batch_size, 3, H, W]."""
    if not isinstance(image, torch.Tensor):
        if not hasattr(image, "convert"):
            raise UserError(f"{name} must be a PIL image or a [B, 3, H, W] tensor, got {type(image).__name__}")
        array = np.array(image.convert("RGB"))[None].transpose(0, 3, 1, 2)
        image = torch.from_numpy(array).to(torch.float32) / 127.5 - 1.0
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise UserError(f"{name} must have shape [B, 3, H, W], got {list(image.shape)}")
    return _repeat_to(image.float(), batch_size, name)


def as_mask_batch(mask, batch_size):
    """PIL image (white = repaint) or [B|1, 1, H, W] tensor in [0, 1] -> binary float mask [B, 1, H, W]."""
    if not isinstance(mask, torch.Tensor):
        if not hasattr(mask, "convert"):
            raise UserError(f"mask must be a PIL image or a [B, 1, H, W] tensor, got {type(mask).__name__}")
        mask = torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] != 1:
        raise UserError(f"mask must have one channel ([B, 1, H, W]), got {list(mask.shape)}")
    mask = (mask.float() >= 0.5).float()  # official: binarised at 0.5
    return _repeat_to(mask, batch_size, "mask")


def _repeat_to(x, batch_size, name):
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] != 1:
        raise UserError(f"got {x.shape[0]} {name}s for {batch_size} prompts; pass one or one per prompt")
    return x.repeat(batch_size, *([1] * (x.ndim - 1)))


def latent_size_of(model, height, width, what="image"):
    f, m = vae_factor(model), unet_multiple(model)
    if height % (f * m) or width % (f * m):
        raise UserError(f"{what} is {width}x{height}; its sides must be multiples of {f * m} for this model "
                        f"(resize or pad it)")
    return height // f, width // f


def _prompts(prompts):
    return [prompts] if isinstance(prompts, str) else list(prompts)


@torch.no_grad()
def text_conditioning(model, prompts, negative_prompt="", prompt_options=None, with_uncond=True):
    """(c, uc): text embeddings of the prompts and of the negative prompt, one per prompt.

    ``prompt_options`` (emphasis, truncate, clip_skip) go to the text encoder. Prompts longer than
    one 75-token chunk make longer conditioning: the shorter side is padded with empty-prompt
    chunks so that cond and uncond can share one batch. ``uc`` is None without ``with_uncond``.
    With ``steps`` in ``prompt_options`` (the sampled steps), prompt editing ``[from:to:when]`` and
    alternation ``[a|b]`` make ``ScheduledConditioning``s that the samplers resolve step by step.
    """
    from ldm.modules.prompt_conditioning import pad_to_same_length
    prompts, options = _prompts(prompts), dict(prompt_options or {})
    steps = options.pop("steps", None)
    negatives = len(prompts) * [negative_prompt or ""]
    if steps is not None and _has_schedules(prompts + (negatives if with_uncond else []), steps):
        from ldm.modules.prompt_conditioning import scheduled_conditioning, scheduled_conditioning_pair
        if not with_uncond:
            return scheduled_conditioning(model, prompts, steps, **options), None
        return scheduled_conditioning_pair(model, prompts, negatives, steps, **options)
    c = model.get_learned_conditioning(prompts, **options)
    if not with_uncond:
        return c, None
    uc = model.get_learned_conditioning(negatives, **options)
    if isinstance(c, torch.Tensor) and c.ndim == 3 and c.shape[1] != uc.shape[1]:
        c, uc = pad_to_same_length(c, uc, model.get_learned_conditioning([""], **options))
    return c, uc


def _has_schedules(prompts, steps):
    """Whether any prompt changes over ``steps`` steps (prompt editing or alternation)."""
    from ldm.modules.prompt_parser import get_learned_conditioning_prompt_schedules
    return any(len(schedule) > 1 for schedule in get_learned_conditioning_prompt_schedules(prompts, steps))


def _require(model, family, label):
    from ldm.models.diffusion.families import model_family
    if model_family(model) != family:
        raise UserError(f"{type(model).__name__} is not {label} model; load {label} checkpoint and config")


@torch.no_grad()
def inpaint_conditioning(model, image, mask, prompts, negative_prompt="", prompt_options=None):
    """Inpainting: the mask (1 = repaint, binarised at 0.5) and the image with the masked area zeroed."""
    _require(model, "inpainting", "an inpainting")
    prompts = _prompts(prompts)
    device = model_device(model)
    image = as_image_batch(image, len(prompts)).to(device)
    mask = as_mask_batch(mask, len(prompts)).to(device)
    if mask.shape[-2:] != image.shape[-2:]:
        raise UserError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                        f"{image.shape[-1]}x{image.shape[-2]}; they must be the same size")
    latent_size = latent_size_of(model, *image.shape[-2:])
    masked_image = image * (mask < 0.5)
    images = {key: mask for key in model.concat_keys}
    images[model.masked_image_key] = masked_image
    c, uc = text_conditioning(model, prompts, negative_prompt, prompt_options)
    c_cat = model.concat_conditioning(images, latent_size)
    return Conditioning({"c_concat": [c_cat], "c_crossattn": [c]}, {"c_concat": [c_cat], "c_crossattn": [uc]},
                        (model.channels, *latent_size), {"mask": mask, "masked_image": masked_image})


@torch.no_grad()
def depth_conditioning(model, prompts, image=None, depth=None, negative_prompt="", size=None, prompt_options=None):
    """Depth-to-image: MiDaS depth of ``image``, or the given ``depth`` map [B|1, 1, H, W] (larger = nearer).

    The latent size follows ``image`` (or ``size`` = (height, width) in pixels when only a depth map
    is given). ``extras["depth"]`` is the depth before resizing, for display.
    """
    _require(model, "depth", "a depth-to-image")
    from ldm.modules.midas.api import midas_input
    prompts = _prompts(prompts)
    device = model_device(model)
    if image is None and depth is None:
        raise UserError("depth conditioning needs an image (to estimate depth from) or a depth map")
    if image is not None:
        image = as_image_batch(image, len(prompts)).to(device)
        size = image.shape[-2:]
    elif size is None:
        raise UserError("with a depth map and no image, pass size=(height, width) of the image to generate")
    latent_size = latent_size_of(model, *size)
    if depth is not None:
        depth = torch.as_tensor(depth, dtype=torch.float32)
        while depth.ndim < 4:
            depth = depth[None]
        depth = _repeat_to(depth, len(prompts), "depth map").to(device)
    else:
        depth = model.estimate_depth(midas_input(image, model.depth_model.model_type))
    c, uc = text_conditioning(model, prompts, negative_prompt, prompt_options)
    # the official scripts normalise without the training code's 1e-3 in the denominator
    c_cat = model.concat_conditioning({"depth": depth}, latent_size, eps=0.0)
    return Conditioning({"c_concat": [c_cat], "c_crossattn": [c]}, {"c_concat": [c_cat], "c_crossattn": [uc]},
                        (model.channels, *latent_size), {"depth": depth, "image": image})


@torch.no_grad()
def upscale_conditioning(model, low_res, prompts, noise_level, negative_prompt="", prompt_options=None):
    """x4 upscaling: the low-res image noised to ``noise_level`` (also the U-Net's class label).

    The latent has the low-res image's size; the decoded result is 4x larger.
    """
    _require(model, "upscaling", "an upscaling")
    prompts = _prompts(prompts)
    device = model_device(model)
    low_res = as_image_batch(low_res, len(prompts), "low-res image").to(device)
    latent_size = tuple(low_res.shape[-2:])
    m = unet_multiple(model)
    if latent_size[0] % m or latent_size[1] % m:
        raise UserError(f"low-res image is {latent_size[1]}x{latent_size[0]}; its sides must be multiples of {m}")
    c, uc = text_conditioning(model, prompts, negative_prompt, prompt_options)
    noised, levels = model.low_res_conditioning(low_res, noise_level)
    return Conditioning({"c_concat": [noised], "c_crossattn": [c], "c_adm": levels},
                        {"c_concat": [noised], "c_crossattn": [uc], "c_adm": levels},
                        (model.channels, *latent_size), {"noise_level": levels})


@torch.no_grad()
def unclip_conditioning(model, prompts, image=None, embedding=None, noise_level=0, negative_prompt="",
                        size=None, prompt_options=None):
    """Stable unCLIP: the CLIP embedding of ``image`` (or a given ``embedding`` [B|1, D]), noised to
    ``noise_level``. ``size`` = (height, width) in pixels, default the model's native size."""
    _require(model, "unclip", "an unCLIP")
    prompts = _prompts(prompts)
    device = model_device(model)
    if (image is None) == (embedding is None):
        raise UserError("unCLIP conditioning needs exactly one of an image or an image embedding")
    if image is not None:
        embedding = model.embed_images(as_image_batch(image, len(prompts)).to(device))
    else:
        embedding = torch.as_tensor(embedding, dtype=torch.float32)
        embedding = _repeat_to(embedding.reshape(-1, embedding.shape[-1]), len(prompts), "embedding").to(device)
    if size is None:
        size = (model.image_size * vae_factor(model),) * 2
    latent_size = latent_size_of(model, *size, what="the requested size")
    c, uc = text_conditioning(model, prompts, negative_prompt, prompt_options)
    adm = model.adm_conditioning(embedding, noise_level=noise_level)
    return Conditioning({"c_crossattn": [c], "c_adm": adm}, {"c_crossattn": [uc], "c_adm": torch.zeros_like(adm)},
                        (model.channels, *latent_size), {"embedding": embedding})
