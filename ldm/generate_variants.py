"""Sampling library API for the image-conditioned families, beside ``ldm.generate``'s txt2img/img2img.

    inpaint            repaint where a mask is white: a 9-channel inpainting model, or any
                       text-to-image model by keeping the known region at every DDIM/PLMS step
    depth2img          img2img conditioned on a depth map (MiDaS, or one given as an image)
    upscale            the x4 upscaler, tiled in low-resolution space so memory stays bounded
    unclip_variations  stable unCLIP: new images from an image's CLIP embedding (or a given one)

Same conventions as ``ldm.generate``: ``prompts`` is one string (``n_samples`` images per round)
or a list cut into batches; ``on_batch(images, prompts)`` is called as batches finish; results
come back in order as PIL images. Images whose sides the model cannot take are edge-padded to
the next fitting size and the result cropped back, so outputs keep the input's size.
"""
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.conditioning import (depth_conditioning, inpaint_conditioning, latent_size_of, unclip_conditioning,
                              unet_multiple, upscale_conditioning, vae_factor)
from ldm.errors import UserError
from ldm.models.diffusion.families import model_family
from ldm.generate import (Sampling, check_strength, encode_image, max_batch, model_device, native_size,
                          prompt_options, run_generation, sample, sample_from_latent, text_conditioning)
from ldm.image_io import images_to_tensor, tensor_to_images

log = logging.getLogger(__name__)

FAMILY_NAMES = {"inpainting": "an inpainting", "depth": "a depth-to-image", "upscaling": "an x4 upscaling",
                "unclip": "a stable unCLIP", "txt2img": "a text-to-image"}
OUTPAINT_MULTIPLE = 8


def require_family(model, *families):
    family = model_family(model)
    if family not in families:
        wanted = " or ".join(FAMILY_NAMES[f] for f in families)
        raise UserError(f"this is {FAMILY_NAMES[family]} model ({type(model).__name__}); this needs {wanted} "
                        f"model: load its checkpoint with the config released for it")
    return family


def size_multiple(model):
    """Image sides must be multiples of this (VAE factor x U-Net down-sampling)."""
    return vae_factor(model) * unet_multiple(model)


# ---------------------------------------------------------------------------------------------
# images and masks

def open_image(path, what="image"):
    """Open an image file keeping its mode (a mask's alpha matters), or raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; pass the path to a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{what} '{path}' cannot be read ({err}); pass a PNG or JPEG file") from None


def to_mask(image):
    """Any PIL image -> "L" mask (white = repaint); transparent pixels count as black."""
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L")


def fit_to(image, size, what):
    """``image`` resized to ``size`` (w, h) with a warning when it is not that size already."""
    if image.size == tuple(size):
        return image
    log.warning("%s is %dx%d but the image is %dx%d; resizing the %s to fit", what, *image.size, *size, what)
    return image.resize(tuple(size), resample=Image.BILINEAR)


def pad_to_multiple(image, multiple):
    """Edge-pad right and bottom up to multiples of ``multiple`` (as the official demos pad)."""
    w, h = image.size
    pad_w, pad_h = -w % multiple, -h % multiple
    if not pad_w and not pad_h:
        return image
    log.info("padding %dx%d to %dx%d (multiples of %d); the result is cropped back", w, h, w + pad_w, h + pad_h,
             multiple)
    array = np.asarray(image)
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
    return Image.fromarray(np.pad(array, widths, mode="edge"))


def outpaint_canvas(image, mask, left=0, right=0, top=0, bottom=0):
    """(canvas, mask): ``image`` extended by the given pixels (rounded up to multiples of 8) with
    edge pixels, and a mask that is white over the new area (and wherever ``mask`` is white)."""
    amounts = [left, right, top, bottom]
    if any(a < 0 for a in amounts):
        raise UserError(f"outpaint amounts must be 0 or more pixels, got {amounts}")
    rounded = [-(-a // OUTPAINT_MULTIPLE) * OUTPAINT_MULTIPLE for a in amounts]
    if rounded != amounts:
        log.warning("outpaint amounts rounded up to multiples of %d: %s (left, right, top, bottom)",
                    OUTPAINT_MULTIPLE, ",".join(map(str, rounded)))
    left, right, top, bottom = rounded
    w, h = image.size
    mask = fit_to(to_mask(mask), (w, h), "mask") if mask is not None else Image.new("L", (w, h), 0)
    canvas = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    new_mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    new_mask[top:top + h, left:left + w] = np.asarray(mask)
    return Image.fromarray(canvas), Image.fromarray(new_mask)


def _crop(images, size):
    return [im.crop((0, 0, *size)) if im.size != tuple(size) else im for im in images]


def _start_code(rng, n, shape, device):
    """Start noise from a NumPy RandomState, as the official inpainting and upscaling demos draw it."""
    return torch.from_numpy(rng.randn(n, *shape)).to(device=device, dtype=torch.float32)


def _pixels(model, z):
    """Decoded latents as float [B, 3, H, W] in [0, 1]."""
    return torch.clamp((model.decode_first_stage(z).float() + 1.0) / 2.0, min=0.0, max=1.0)


# ---------------------------------------------------------------------------------------------
# inpainting

def inpaint(model, image, mask, prompts, **sampling):
    """Repaint ``image`` (PIL) where ``mask`` (PIL, any mode; white = repaint) is white.

    An inpainting model (9 U-Net input channels) sees the mask and the masked image. A text-to-image
    model instead samples freely and, before every step, resets the known region to the image's
    latent noised to that step (latent-diffusion's inpainting; the sigma samplers and DPM-Solver++
    replace their clean-latent estimate there instead); its known pixels are pasted back at the end. A mask of another size is resized to the image with a warning. Other keyword
    arguments: :class:`ldm.generate.Sampling`.
    """
    sampling = Sampling(**sampling)
    family = require_family(model, "inpainting", "txt2img")
    image = image.convert("RGB")
    mask = fit_to(to_mask(mask), image.size, "mask")
    if not np.asarray(mask).any():
        log.warning("the mask is all black: nothing will be repainted")
    padded_image = pad_to_multiple(image, size_multiple(model))
    padded_mask = pad_to_multiple(mask, size_multiple(model))
    shape = [model.channels, *latent_size_of(model, padded_image.height, padded_image.width)]
    binary = np.asarray(padded_mask) >= 128   # binarised at 0.5, as the inpainting models see it
    repaint_image = Image.fromarray(binary.astype(np.uint8) * 255)
    rng = np.random.RandomState(sampling.seed)

    def make_batch(sampler, batch, _):
        n = len(batch)
        x_T = _start_code(rng, n, shape, model_device(model))
        if family == "inpainting":
            cond = inpaint_conditioning(model, padded_image, padded_mask, batch, sampling.negative_prompt,
                                        prompt_options(model, sampling))
            pixels = _pixels(model, sample(sampler, sampling, cond.cond, cond.uncond, [n, *shape], x_T=x_T))
            batch_images = tensor_to_images(pixels)
        else:
            repaint = torch.from_numpy(binary).float()[None, None].to(x_T.device)  # [1, 1, H, W], 1 = repaint
            pixels = _blend_inpaint(model, sampler, sampling, padded_image, repaint, batch, x_T)
            # the known pixels exactly as they were
            batch_images = [Image.composite(im, padded_image, repaint_image) for im in tensor_to_images(pixels)]
        return _crop(batch_images, image.size)

    return run_generation(model, prompts, sampling, make_batch)


def _blend_inpaint(model, sampler, sampling, image, repaint, prompts, x_T):
    """Decoded samples [B, 3, H, W] of a text-to-image model that keeps the known latent region at
    every step; ``repaint`` [1, 1, H, W] is 1 where to repaint."""
    n = len(prompts)
    c, uc = text_conditioning(model, prompts, sampling)
    x0 = encode_image(model, image, n)
    # a latent pixel is repainted when any pixel under it is: the known region never leaks into the hole
    keep = 1.0 - F.max_pool2d(repaint, kernel_size=vae_factor(model))
    keep = keep.expand(n, 1, *x0.shape[-2:]).to(x0.dtype)
    # the sampler's convention: img = q_sample(x0, t) * mask + (1 - mask) * img, so mask = keep
    samples = sample(sampler, sampling, c, uc, list(x0.shape), mask=keep, x0=x0, x_T=x_T)
    return _pixels(model, keep * x0 + (1.0 - keep) * samples)


# ---------------------------------------------------------------------------------------------
# depth to image

def depth_map_tensor(image):
    """A depth image (PIL, any mode, 16-bit too; white = near, as MiDaS shows it) -> float [1, 1, H, W].

    Only relative values matter: the model and the saved depth image normalise each map to its range.
    """
    return torch.from_numpy(np.asarray(image.convert("F"), dtype=np.float32).copy())[None, None]


def depth_to_image(depth, size, visible=None):
    """Depth [1, 1, h, w] -> "L" image: resized to ``size`` (w, h), cropped to the top-left ``visible``
    (w, h), then stretched to black (far) .. white (near)."""
    depth = F.interpolate(depth[:1].float(), size=(size[1], size[0]), mode="bilinear", align_corners=False,
                          antialias=True)
    visible = visible or size
    depth = depth[0, 0, :visible[1], :visible[0]]
    lo, hi = depth.min(), depth.max()
    shown = (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)
    return Image.fromarray((shown.clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8))


def depth2img(model, init_image, prompts, *, strength=0.9, depth_map=None, on_depth=None, **sampling):
    """Re-draw ``init_image`` keeping its depth; returns (images, depth image used).

    ``depth_map`` (PIL, white = near) replaces the MiDaS estimate, which needs the checkpoint's
    ``depth_model.*`` weights. Noising and denoising follow img2img (``strength``).
    ``on_depth(depth_image)`` is called once the depth is known, before sampling starts. Other
    keyword arguments: :class:`ldm.generate.Sampling` (default scale 9, as officially).
    """
    sampling = Sampling(**{"scale": 9.0, **sampling})
    require_family(model, "depth")
    check_strength(strength)
    init_image = init_image.convert("RGB")
    padded = pad_to_multiple(init_image, size_multiple(model))
    depth = None
    if depth_map is not None:
        depth_map = fit_to(depth_map.convert("F"), init_image.size, "depth map")
        depth = depth_map_tensor(pad_to_multiple(depth_map, size_multiple(model))).to(model_device(model))
    depth_images = []
    log.info("depth2img: %d of %d steps (strength %.2f)", int(strength * sampling.steps), sampling.steps, strength)

    def setup(sampler):
        nonlocal depth
        if depth is None:
            from ldm.modules.midas.api import midas_input
            pixels = images_to_tensor([padded]).to(model_device(model))
            depth = model.estimate_depth(midas_input(pixels, model.depth_model.model_type))
        depth_images.append(depth_to_image(depth, padded.size, init_image.size))
        if on_depth is not None:
            on_depth(depth_images[0])
        return encode_image(model, padded, max_batch(prompts, sampling.n_samples))

    def make_batch(sampler, batch, init_latent):
        cond = depth_conditioning(model, batch, image=padded, depth=depth, negative_prompt=sampling.negative_prompt,
                                  prompt_options=prompt_options(model, sampling, strength))
        samples = sample_from_latent(sampler, sampling, init_latent[:len(batch)], strength, cond.cond, cond.uncond)
        return _crop(tensor_to_images(_pixels(model, samples)), init_image.size)

    images = run_generation(model, prompts, sampling, make_batch, setup)
    return images, depth_images[0]


# ---------------------------------------------------------------------------------------------
# x4 upscaling

def noise_level_range(model):
    """(lowest, highest) noise level the model's augmentation accepts."""
    augmentor = getattr(model, "low_scale_model", None)
    if augmentor is None:
        augmentor = getattr(model, "noise_augmentor", None)
    if augmentor is None or not hasattr(augmentor, "num_timesteps"):
        return 0, 0
    return 0, min(augmentor.max_noise_level, augmentor.num_timesteps - 1)


def check_noise_level(model, noise_level):
    lo, hi = noise_level_range(model)
    if not isinstance(noise_level, (int, np.integer)) or not lo <= noise_level <= hi:
        raise UserError(f"noise level {noise_level} is out of range for this model; use a whole number from "
                        f"{lo} to {hi}")


def tile_starts(size, tile, overlap):
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` in common."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length, ramp):
    """1-D tile weight: rises linearly over ``ramp`` pixels at both ends, never reaches 0."""
    i = np.arange(length, dtype=np.float32)
    return np.minimum(1.0, np.minimum(i + 1, length - i) / (ramp + 1))


class Tiles:
    """Overlapping tiles over an [H, W] low-res image and their places in the ``factor`` times larger
    output. Iterating yields (low-res index, output index) pairs for [B, C, H, W] tensors; each
    tile's output is weighted by ``weight`` and the sum divided by ``total_weight``."""

    def __init__(self, H, W, tile, overlap, factor):
        self.h, self.w = min(tile, H), min(tile, W)
        self.starts = [(y, x) for y in tile_starts(H, self.h, overlap) for x in tile_starts(W, self.w, overlap)]
        self.factor = factor
        ramp = overlap * factor
        self.weight = torch.from_numpy(np.outer(blend_ramp(self.h * factor, ramp), blend_ramp(self.w * factor, ramp)))
        self.total_weight = torch.zeros(1, 1, H * factor, W * factor)
        for _, high in self:
            self.total_weight[high] += self.weight

    def __iter__(self):
        f = self.factor
        for y, x in self.starts:
            low = (slice(None), slice(None), slice(y, y + self.h), slice(x, x + self.w))
            high = (slice(None), slice(None), slice(y * f, (y + self.h) * f), slice(x * f, (x + self.w) * f))
            yield low, high


def upscale(model, low_res, prompts="", *, noise_level=20, tile=128, tile_overlap=None, **sampling):
    """Upscale ``low_res`` (PIL) by the model's factor (x4 for the official upscaler).

    Images larger than ``tile`` low-res pixels are cut into overlapping tiles (``tile_overlap``
    pixels in common), each sampled on its own and decoded; overlaps are blended with linear
    ramps (default overlap: a quarter of the tile, at most 32). The noised low-res image and the
    start noise are drawn once for the whole image, so neighbouring tiles start from the same
    values where they overlap. ``tile=0`` never tiles. Other keyword arguments:
    :class:`ldm.generate.Sampling` (default scale 9, as officially).
    """
    sampling = Sampling(**{"scale": 9.0, **sampling})
    require_family(model, "upscaling")
    check_noise_level(model, noise_level)
    m, f = unet_multiple(model), vae_factor(model)
    if tile and (tile < m or tile % m):
        raise UserError(f"tile must be 0 (no tiling) or a positive multiple of {m} low-res pixels, got {tile}")
    if tile_overlap is None:
        tile_overlap = min(32, tile // 4)
    if tile and not 0 <= tile_overlap < tile:
        raise UserError(f"tile overlap must be from 0 to {tile - 1} pixels, got {tile_overlap}")
    low_res = low_res.convert("RGB")
    padded = pad_to_multiple(low_res, m)
    W, H = padded.size
    tiles = Tiles(H, W, tile or max(H, W), tile_overlap, f)
    if len(tiles.starts) > 1:
        log.info("upscaling %dx%d in %d tiles of %dx%d low-res pixels", W, H, len(tiles.starts), tiles.w, tiles.h)
    rng = np.random.RandomState(sampling.seed)

    def make_batch(sampler, batch, _):
        n = len(batch)
        cond = upscale_conditioning(model, padded, batch, noise_level, sampling.negative_prompt,
                                    prompt_options(model, sampling))
        x_T = _start_code(rng, n, cond.shape, model_device(model))
        out = torch.zeros(n, 3, H * f, W * f)
        for low, high in tiles:
            c, uc = (dict(side, c_concat=[side["c_concat"][0][low]]) for side in (cond.cond, cond.uncond))
            samples = sample(sampler, sampling, c, uc, [n, cond.shape[0], tiles.h, tiles.w], x_T=x_T[low])
            out[high] += _pixels(model, samples).cpu() * tiles.weight
        return _crop(tensor_to_images(out / tiles.total_weight), (low_res.width * f, low_res.height * f))

    return run_generation(model, prompts, sampling, make_batch)


# ---------------------------------------------------------------------------------------------
# unCLIP image variations

def embedding_width(model):
    """Width of the CLIP image embedding the model takes (half the U-Net's ``y`` with noise augmentation)."""
    width = model.model.diffusion_model.label_emb[0][0].in_features
    return width // 2 if model.noise_augmentor is not None else width


def load_embedding(path):
    """A CLIP image embedding [B, D] from a .pt/.pth/.safetensors file holding one tensor (or one in a dict)."""
    from ldm.checkpoint import UNREADABLE, read_state_dict
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding file '{path}' does not exist; pass a .pt or .safetensors file")
    if path.suffix == ".safetensors":
        tensors = read_state_dict(path)
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE as err:  # unpickling bad bytes fails with almost any exception type
            raise UserError(f"embedding file '{path}' cannot be read ({type(err).__name__}); save it with "
                            f"torch.save(tensor) or safetensors") from None
    if isinstance(tensors, dict):
        found = [v for v in tensors.values() if isinstance(v, torch.Tensor)]
        tensors = found[0] if len(found) == 1 else None
    if not isinstance(tensors, torch.Tensor) or tensors.ndim not in (1, 2) or tensors.numel() == 0:
        raise UserError(f"embedding file '{path}' must hold one tensor of shape [D] or [B, D]")
    return tensors.float().reshape(-1, tensors.shape[-1])


def unclip_variations(model, prompts="", *, image=None, embedding=None, noise_level=0, H=None, W=None,
                      **sampling):
    """Variations of ``image`` (PIL) or of a CLIP image ``embedding`` ([D] or [1|B, D] tensor).

    ``noise_level`` noises the embedding first (more = looser variations); the text prompt is
    optional. Size ``H`` x ``W`` pixels, default the model's native size. Other keyword arguments:
    :class:`ldm.generate.Sampling` (default scale 10, as officially).
    """
    sampling = Sampling(**{"scale": 10.0, **sampling})
    require_family(model, "unclip")
    if (image is None) == (embedding is None):
        raise UserError("unCLIP variations need exactly one of an image or an image embedding")
    check_noise_level(model, noise_level)
    native_h, native_w = native_size(model)
    H, W = H or native_h, W or native_w
    latent_size = latent_size_of(model, H, W, what="the requested size")
    if embedding is not None:
        embedding = torch.as_tensor(embedding, dtype=torch.float32)
        if embedding.shape[-1] != embedding_width(model):
            raise UserError(f"the embedding has width {embedding.shape[-1]} but this model takes "
                            f"{embedding_width(model)}; use an embedding from the model's own CLIP image encoder")
        embedding = embedding.reshape(-1, embedding.shape[-1])

    def setup(sampler):
        if image is not None:
            return model.embed_images(images_to_tensor([image.convert("RGB")]).to(model_device(model)))
        return embedding

    def make_batch(sampler, batch, embedded):
        n = len(batch)
        cond = unclip_conditioning(model, batch, embedding=embedded[:n] if len(embedded) > 1 else embedded,
                                   noise_level=noise_level, negative_prompt=sampling.negative_prompt, size=(H, W),
                                   prompt_options=prompt_options(model, sampling))
        samples = sample(sampler, sampling, cond.cond, cond.uncond, [n, model.channels, *latent_size])
        return tensor_to_images(_pixels(model, samples))

    return run_generation(model, prompts, sampling, make_batch, setup)
