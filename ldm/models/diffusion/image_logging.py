"""``LatentDiffusion.log_images``: the image panels the ImageLogger callback writes during training.

Keys (all tensors [N, C, H, W] in [-1, 1]): ``inputs``, ``reconstruction``, ``conditioning`` (captions
rendered as text), ``diffusion_row`` (one input noised at increasing t), ``samples`` (DDIM),
``denoise_row`` (DDIM x0 predictions), ``samples_cfg_scale_<s>`` (classifier-free guidance against the
encoding of the empty prompt), ``samples_inpainting`` / ``samples_outpainting`` / ``mask`` (DDIM with
the centre, then the border, of the input latent kept).
"""
import textwrap
from contextlib import nullcontext

import numpy as np
import torch
from einops import rearrange
from omegaconf import ListConfig
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import isimage

TEXT_KEYS = ("caption", "txt")
MIN_TEXT_IMAGE_SIZE = 128  # captions on 16-pixel images would be unreadable


def log_txt_as_img(wh, xc, size=10):
    """Render strings as black-on-white images [B, 3, H, W] in [-1, 1], wrapped to the image width."""
    w, h = (max(int(s), MIN_TEXT_IMAGE_SIZE) for s in wh)
    font = ImageFont.load_default()
    chars_per_line = max(1, int(40 * w / 256))
    images = []
    for text in xc:
        canvas = Image.new("RGB", (w, h), color="white")
        lines = textwrap.wrap(text, width=chars_per_line, break_long_words=True)
        ImageDraw.Draw(canvas).text((0, 0), "\n".join(lines), fill="black", font=font)
        images.append(np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images))


def sample_log(model, cond, batch_size, ddim_steps, ddim_eta=0., **kwargs):
    """DDIM samples (latents) and their intermediates for ``cond``."""
    if ddim_steps is None:
        raise UserError("log_images needs ddim_steps (ancestral sampling over every timestep is not provided)")
    sampler = DDIMSampler(model)
    shape = (model.channels, model.image_size, model.image_size)
    return sampler.sample(ddim_steps, batch_size, shape, cond, verbose=False, eta=ddim_eta, progress=False, **kwargs)


def unconditional_conditioning(model, n, null_label=None):
    """Conditioning of the "no prompt" input used for guidance: the encoding of ``null_label`` (default "")."""
    if null_label is None and hasattr(model, "get_unconditional_conditioning"):
        return model.get_unconditional_conditioning(n)
    if null_label is None and model.cond_stage_key in ("class_label", "cls"):
        return model.get_learned_conditioning(
            model.cond_stage_model.get_unconditional_conditioning(n, device=model.device))
    label = "" if null_label is None else null_label
    if isinstance(label, ListConfig):
        label = list(label)
    labels = label if isinstance(label, list) else [label] * n
    return model.get_learned_conditioning(labels)


def diffusion_row(model, z, n_row):
    """Decodings of the first ``n_row`` latents noised to t = 0, log_every_t, ..., T - 1, as one grid."""
    z_start = z[:n_row]
    row = []
    for t in range(model.num_timesteps):
        if t % model.log_every_t == 0 or t == model.num_timesteps - 1:
            ts = torch.full((z_start.shape[0],), t, device=model.device, dtype=torch.long)
            row.append(model.decode_first_stage(model.q_sample(x_start=z_start, t=ts, noise=torch.randn_like(z_start))))
    row = torch.stack(row)  # [n_steps, n_row, C, H, W]
    grid = rearrange(row, "n b c h w -> (b n) c h w")
    return make_grid(grid, nrow=row.shape[0])[None]


def denoise_row(model, samples):
    """x0 predictions along the DDIM trajectory, decoded: one row per image."""
    decoded = torch.stack([model.decode_first_stage(z) for z in samples])  # [n_steps, B, C, H, W]
    grid = rearrange(decoded, "n b c h w -> (b n) c h w")
    return make_grid(grid, nrow=decoded.shape[0])[None]


def centre_mask(n, h, w, device):
    """[N, 1, h, w] latent mask: 1 keeps the input latent, 0 (the central square) is sampled."""
    mask = torch.ones(n, 1, h, w, device=device)
    mask[:, :, h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.
    return mask


@torch.no_grad()
def log_images(model, batch, N=8, n_row=4, sample=True, ddim_steps=50, ddim_eta=0., return_keys=None,
               quantize_denoised=True, inpaint=True, plot_denoise_rows=False, plot_progressive_rows=False,
               plot_diffusion_rows=True, unconditional_guidance_scale=1., unconditional_guidance_label=None,
               use_ema_scope=True, **kwargs):
    """The official ``LatentDiffusion.log_images`` panels (see the module docstring).

    ``quantize_denoised`` only applies to VQ first stages and is ignored; ``plot_progressive_rows`` (1000
    ancestral steps) is not provided: ``plot_denoise_rows`` shows the DDIM trajectory instead.
    """
    if plot_progressive_rows:
        raise UserError("plot_progressive_rows is not supported; use plot_denoise_rows: True")
    ema_scope = model.ema_scope if use_ema_scope else (lambda context=None: nullcontext())
    z, c, x, xrec, xc = model.get_input(batch, model.first_stage_key, return_first_stage_outputs=True,
                                        force_c_encode=True, return_original_cond=True, bs=N)
    N = min(x.shape[0], N)
    n_row = min(x.shape[0], n_row)
    log = {"inputs": x, "reconstruction": xrec}
    if model.model.conditioning_key is not None:
        if hasattr(model.cond_stage_model, "decode"):
            log["conditioning"] = model.cond_stage_model.decode(c)
        elif model.cond_stage_key in TEXT_KEYS:
            log["conditioning"] = log_txt_as_img(x.shape[2:], list(batch[model.cond_stage_key])[:N])
        elif model.cond_stage_key in ("class_label", "cls") and "human_label" in batch:
            log["conditioning"] = log_txt_as_img(x.shape[2:], list(batch["human_label"])[:N])
        elif isimage(xc):
            log["conditioning"] = xc
    if plot_diffusion_rows:
        log["diffusion_row"] = diffusion_row(model, z, n_row)
    if sample:
        with ema_scope("Sampling"):
            samples, intermediates = sample_log(model, c, N, ddim_steps, ddim_eta)
        log["samples"] = model.decode_first_stage(samples)
        if plot_denoise_rows:
            log["denoise_row"] = denoise_row(model, intermediates["pred_x0"])
    if unconditional_guidance_scale > 1.0:
        uc = unconditional_conditioning(model, N, unconditional_guidance_label)
        if isinstance(c, dict):   # hints, masks, image embeddings: the same on both sides of guidance
            uc = {**c, "c_crossattn": [uc]}
        with ema_scope("Sampling with classifier-free guidance"):
            samples_cfg, _ = sample_log(model, c, N, ddim_steps, ddim_eta,
                                        unconditional_guidance_scale=unconditional_guidance_scale,
                                        unconditional_conditioning=uc)
        log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = model.decode_first_stage(samples_cfg)
    if sample and inpaint:
        mask = centre_mask(N, z.shape[2], z.shape[3], z.device)
        for name, keep in (("samples_inpainting", mask), ("samples_outpainting", 1. - mask)):
            with ema_scope("Plotting inpainting"):
                samples, _ = sample_log(model, c, N, ddim_steps, ddim_eta, x0=z[:N], mask=keep)
            log[name] = model.decode_first_stage(samples)
        log["mask"] = mask
    if return_keys:
        if not set(log).intersection(return_keys):
            return log
        return {key: log[key] for key in return_keys if key in log}
    return log
