"""Latent diffusion models whose U-Net also sees image-shaped conditioning concatenated to the latent.

``LatentFinetuneDiffusion`` is the base (concat keys, fine-tuning a text-to-image checkpoint into
a wider input layer); ``LatentInpaintDiffusion`` concatenates the inpainting mask and the latent
of the masked image (4 + 1 + 4 = 9 U-Net input channels).

With ``finetune_keys``, a checkpoint whose U-Net input conv has fewer channels loads into this
model: the first ``keep_finetune_dims`` input channels take the checkpoint's weights and the new
ones start at zero, so the fine-tuned model starts out computing exactly what the old one did.
"""
import logging

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.models.diffusion.ddpm_base import DDPM
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.freeze import freeze_module
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

DEFAULT_FINETUNE_KEYS = ("model.diffusion_model.input_blocks.0.0.weight",
                         "model_ema.diffusion_modelinput_blocks00weight")


def widen_input_weights(sd, own, finetune_keys, keep_dims):
    """Zero-pad the input-channel dim of ``sd[k]`` for k in ``finetune_keys`` to ``own[k]``'s shape."""
    for key in finetune_keys:
        if key not in sd:
            continue
        if key not in own:
            logger.info("finetune key %s is not in the model; leaving it to the loader", key)
            continue
        old = sd[key]
        if old.shape == own[key].shape:  # already widened (e.g. resuming a fine-tuning run)
            continue
        if old.shape[1] != keep_dims:
            raise UserError(f"finetune key {key} has {old.shape[1]} input channels in the checkpoint, but "
                            f"keep_finetune_dims is {keep_dims}")
        new = torch.zeros_like(own[key], dtype=old.dtype)
        new[:, :keep_dims, ...] = old
        logger.info("%s: keeping the checkpoint's %d input channels, zero-initialising the other %d",
                    key, keep_dims, new.shape[1] - keep_dims)
        sd[key] = new
    return sd


class LatentFinetuneDiffusion(LatentDiffusion):
    """Base of the concat-conditioned SD 2 models (inpainting, depth-to-image).

    ``frozen_stages`` maps attribute names to configs of extra frozen sub-models (e.g. the depth
    estimator); like every sub-model they exist before ``ckpt_path`` is loaded, so their weights
    load with it.
    """

    def __init__(self, concat_keys, finetune_keys=DEFAULT_FINETUNE_KEYS, keep_finetune_dims=4,
                 c_concat_log_start=None, c_concat_log_end=None, *args, frozen_stages=None, **kwargs):
        if finetune_keys is not None and kwargs.get("ckpt_path") is None:
            raise UserError("finetune_keys is set but there is no ckpt_path to fine-tune from; set ckpt_path or "
                            "finetune_keys: null")
        super().__init__(*args, **kwargs)
        self.finetune_keys = finetune_keys
        self.concat_keys = concat_keys
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start = c_concat_log_start
        self.c_concat_log_end = c_concat_log_end
        for name, config in (frozen_stages or {}).items():
            setattr(self, name, freeze_module(instantiate_from_config(config)))

    def adapt_init_state_dict(self, sd):
        """``ckpt_path`` from a narrower model: widen the ``finetune_keys`` tensors before loading."""
        if self.finetune_keys is None:
            return sd
        return widen_input_weights(dict(sd), self.state_dict(), self.finetune_keys, self.keep_dims)

    def concat_conditioning(self, images, latent_size):
        """The c_concat tensor [B, C, h, w] from ``images`` ({concat key: [B, C, H, W] tensor})."""
        raise NotImplementedError

    def concat_inputs(self, batch, bs=None):
        """``batch[k]`` for each concat key as float [B, C, H, W] on the model's device (dataset layout is BHWC)."""
        return {key: DDPM.get_input(self, batch, key)[:bs].to(self.device) for key in self.concat_keys}

    @torch.no_grad()
    def get_input(self, batch, k, cond_key=None, bs=None, return_first_stage_outputs=False):
        """(z, {"c_concat": [...], "c_crossattn": [text]}), plus x, reconstruction and raw cond on request."""
        if self.cond_stage_trainable:
            raise UserError(f"{type(self).__name__} does not support a trainable conditioning encoder")
        z, c, x, xrec, xc = super().get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                              force_c_encode=True, return_original_cond=True, bs=bs)
        c_cat = self.concat_conditioning(self.concat_inputs(batch, bs), z.shape[-2:])
        cond = {"c_concat": [c_cat], "c_crossattn": [c]}
        if return_first_stage_outputs:
            return z, cond, x, xrec, xc
        return z, cond


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """Inpainting: the U-Net input is [noisy latent, mask, latent of the masked image].

    The mask is 1 where the image is to be repainted; ``masked_image`` is the image with that
    region zeroed (0 is mid-grey in [-1, 1]). ``concat_keys`` are the batch keys in channel order;
    the one named ``masked_image_key`` is encoded by the VAE, the others are resized to the latent.
    """

    def __init__(self, concat_keys=("mask", "masked_image"), masked_image_key="masked_image", *args, **kwargs):
        if masked_image_key not in concat_keys:
            raise UserError(f"masked_image_key '{masked_image_key}' must be one of concat_keys {list(concat_keys)}")
        super().__init__(concat_keys, *args, **kwargs)
        self.masked_image_key = masked_image_key

    def concat_conditioning(self, images, latent_size):
        """Mask(s) resized to the latent (nearest), the masked image VAE-encoded, in ``concat_keys`` order."""
        parts = []
        for key in self.concat_keys:
            cc = images[key].to(self.device).float()
            if key == self.masked_image_key:
                cc = self.get_first_stage_encoding(self.encode_first_stage(cc))
            else:
                cc = F.interpolate(cc, size=tuple(latent_size))
            parts.append(cc)
        return torch.cat(parts, dim=1)
