"""The x4 upscaler: latent diffusion conditioned on a noise-augmented low-resolution image.

The low-res image (pixels, [-1, 1]) is noised to ``noise_level`` by ``low_scale_model`` and
concatenated to the latent (4 + 3 channels; the f=4 VAE makes the latent the low-res size); the
level itself is the U-Net's class label (``c_adm``). Text comes in through cross-attention.
"""
import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddpm_base import DDPM
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.freeze import freeze_module
from ldm.util import instantiate_from_config


class LatentUpscaleDiffusion(LatentDiffusion):
    def __init__(self, *args, low_scale_config, low_scale_key="LR", noise_level_key=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise UserError("LatentUpscaleDiffusion needs a frozen conditioning encoder (cond_stage_trainable: false)")
        self.instantiate_low_stage(low_scale_config)
        self.low_scale_key = low_scale_key
        if noise_level_key is not None:
            raise UserError("noise_level_key is not supported (the official code does not implement it either)")
        self.noise_level_key = noise_level_key

    def instantiate_low_stage(self, config):
        self.low_scale_model = freeze_module(instantiate_from_config(config))

    def low_res_conditioning(self, x_low, noise_level=None):
        """(noised low-res image [B, 3, h, w], noise levels [B]); random levels when not given."""
        return self.low_scale_model(x_low.to(self.device).float(), noise_level)

    @torch.no_grad()
    def get_input(self, batch, k, cond_key=None, bs=None, log_mode=False):
        """(z, {"c_concat": [noised low-res], "c_crossattn": [text], "c_adm": noise levels})."""
        if not log_mode:
            z, c = super().get_input(batch, k, force_c_encode=True, bs=bs)
        else:
            z, c, x, xrec, xc = super().get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                                  force_c_encode=True, return_original_cond=True, bs=bs)
        x_low = DDPM.get_input(self, batch, self.low_scale_key)[:bs]
        zx, noise_level = self.low_res_conditioning(x_low)
        cond = {"c_concat": [zx], "c_crossattn": [c], "c_adm": noise_level}
        if log_mode:
            return z, cond, x, xrec, xc, x_low, self.low_scale_model.decode(zx), noise_level
        return z, cond
