"""LatentDiffusion: DDPM in the latent space of a frozen autoencoder, with a conditioning encoder.

Checkpoint layout: ``first_stage_model.*`` (the VAE), ``cond_stage_model.*`` (text/image encoder),
``model.diffusion_model.*`` (the U-Net) and the schedule buffers at the root.
"""
import logging

import torch
import torch.distributed as dist

from ldm.errors import UserError
from ldm.models import tiled_vae
from ldm.models.diffusion.ddpm_base import DDPM
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
from ldm.modules.freeze import freeze_module
from ldm.util import default, instantiate_from_config

logger = logging.getLogger(__name__)

# Batch keys whose values are passed to the conditioning encoder as they are (strings, dicts).
RAW_CONDITIONING_KEYS = ("caption", "coordinates_bbox", "txt")


class LatentDiffusion(DDPM):
    # How decode_first_stage/encode_first_stage run the VAE: tiled ("off", "on" or "auto") and in
    # the channels_last layout (see ldm.models.tiled_vae). Sampling sets both for a run
    # (tiled_vae.first_stage_settings); the model's own default is the plain official computation.
    first_stage_tiling = "off"
    first_stage_tiling_stats = "image"
    first_stage_channels_last = False

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, force_null_conditioning=False, *args, **kwargs):
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise UserError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not self.force_null_conditioning:
            conditioning_key = None
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except (AttributeError, KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            # Persistent: a model trained with scale_by_std keeps its data-derived factor in the checkpoint.
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.bbox_tokenizer = None

    # ------------------------------------------------------------------ construction
    def register_schedule(self, **kwargs):
        super().register_schedule(**kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def make_cond_schedule(self):
        self.cond_ids = torch.full(size=(self.num_timesteps,), fill_value=self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        self.cond_ids[:self.num_timesteps_cond] = ids

    def instantiate_first_stage(self, config):
        self.first_stage_model = freeze_module(instantiate_from_config(config))

    def instantiate_cond_stage(self, config):
        if config == "__is_first_stage__":
            logger.info("using the first stage as the conditioning stage")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        elif not self.cond_stage_trainable:
            self.cond_stage_model = freeze_module(instantiate_from_config(config))
        else:
            self.cond_stage_model = instantiate_from_config(config)

    # ------------------------------------------------------------------ first stage and conditioning
    def get_learned_conditioning(self, c, **prompt_options):
        """Conditioning encoder output for ``c``.

        ``prompt_options`` (``emphasis``, ``clip_skip``, ``truncate``; None = the encoder's own setting) go
        to text encoders that read A1111 prompt syntax (``ChunkedTextEncoder``); other encoders refuse them.
        """
        prompt_options = {name: value for name, value in prompt_options.items() if value is not None}
        if prompt_options and not isinstance(self.cond_stage_model, ChunkedTextEncoder):
            raise UserError(f"{type(self.cond_stage_model).__name__} takes no prompt options "
                            f"({', '.join(sorted(prompt_options))}); only prompt text encoders do")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c, **prompt_options)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c, **prompt_options)
            if isinstance(c, DiagonalGaussianDistribution):
                c = c.mode()
            return c
        return self.cond_stage_model(c)

    def get_first_stage_encoding(self, encoder_posterior):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x):
        return tiled_vae.encode(self.first_stage_model, x, self.first_stage_tiling,
                                tiled_vae.tiling_for(self.first_stage_tiling_stats),
                                channels_last=self.first_stage_channels_last)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return tiled_vae.decode(self.first_stage_model, z / self.scale_factor, self.first_stage_tiling,
                                tiled_vae.tiling_for(self.first_stage_tiling_stats),
                                channels_last=self.first_stage_channels_last)

    def differentiable_decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def get_input(self, batch, k, return_first_stage_outputs=False, force_c_encode=False, cond_key=None,
                  return_original_cond=False, bs=None, return_x=False):
        """Latent ``z`` of ``batch[k]`` and the conditioning ``c`` of ``batch[cond_stage_key]``.

        With a trainable conditioning encoder ``c`` stays raw (e.g. strings) so that it is encoded
        inside the training step, with gradients.
        """
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key == k:
                xc = x
            elif cond_key in RAW_CONDITIONING_KEYS:
                xc = batch[cond_key]
            elif cond_key in ("class_label", "cls"):
                xc = batch
            else:
                xc = super().get_input(batch, cond_key).to(self.device)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    # ------------------------------------------------------------------ the denoiser
    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """Route ``cond`` (tensor, list, or dict with c_concat / c_crossattn / c_adm) into the U-Net."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    # ------------------------------------------------------------------ training
    def p_losses(self, x_start, cond, t, noise=None):
        noise = default(noise, lambda: self.training_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        return self.loss_from_output(model_output, x_start, noise, t)

    def forward(self, x, c, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            assert c is not None
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t].to(self.device)
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def shared_step(self, batch, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx):
        """With ``scale_by_std``, set scale_factor = 1 / std(latents) from the first training batch."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            return
        if float(self.scale_factor) != 1.0:
            raise UserError("scale_by_std needs scale_factor: 1.0 (the factor is computed from the data)")
        x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach().flatten()
        std = z.std()
        if dist.is_available() and dist.is_initialized():
            # every rank must use the same factor: average the per-rank estimates
            dist.all_reduce(std)
            std = std / dist.get_world_size()
        self.scale_factor.copy_(1.0 / std)
        logger.info("scale_by_std: setting scale_factor to %.5f", float(self.scale_factor))

    # ------------------------------------------------------------------ image logging
    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=50, ddim_eta=0., **kwargs):
        """Input, reconstruction, conditioning, DDIM samples (with and without guidance): see image_logging.py."""
        # imported here: models do not import samplers at module level
        from ldm.models.diffusion.image_logging import log_images
        return log_images(self, batch, N=N, n_row=n_row, sample=sample, ddim_steps=ddim_steps, ddim_eta=ddim_eta,
                          **kwargs)
