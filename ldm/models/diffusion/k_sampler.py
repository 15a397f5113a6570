"""``KDiffusionSampler``: the ``sample(...)`` interface of ``DDIMSampler`` over the sigma-formulation
samplers of ``ldm.models.diffusion.k_sampling`` (Euler, DPM++, UniPC, ... by name, with a sigma
schedule by name or a user's list of sigmas).

txt2img starts from x = x_T * sigmas[0] with x_T unit-variance noise (as A1111 does); img2img
(``sample_img2img``) runs the last int(strength * steps) steps of the schedule from
init_latent + noise * sigma_start. The SDE samplers' Brownian tree takes its seed from torch's
global generator when sampling starts, so ``seed_everything(seed)`` then sampling gives one image.
"""
import logging

import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddim import _check_batch
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.samplers import check_strength
from ldm.models.diffusion.schedule import finite_alphas_cumprod
from ldm.models.diffusion.k_sampling import (
    K_SAMPLERS,
    DiscreteDenoiser,
    check_schedule,
    make_sigmas,
    sigmas_from_list,
)

logger = logging.getLogger(__name__)


def check_k_sampler(name):
    if name not in K_SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; use one of {', '.join(K_SAMPLERS)}")


class KDiffusionSampler:
    """Sampler ``sampler`` (a ``K_SAMPLERS`` name) on schedule ``schedule`` (a ``SIGMA_SCHEDULES`` name),
    or on the user's ``sigmas`` (text or numbers, see ``sigmas_from_list``) which then replace the
    schedule and fix the step count. ``sampler_options`` go to the sampler function (for example
    ``{"solver_type": "heun"}`` for DPM++ 2M SDE, ``{"order": 2}`` for UniPC)."""

    def __init__(self, model, sampler="euler", schedule="normal", sigmas=None, device=None, sampler_options=None,
                 discard_next_to_last_sigma=False):
        check_k_sampler(sampler)
        check_schedule(schedule)
        self.model = model
        self.sampler = sampler
        self.schedule = schedule
        self.user_sigmas = None if sigmas is None else sigmas_from_list(sigmas)
        self.sampler_options = dict(sampler_options or {})
        # A1111 runs DPM2, DPM2 a and DPM++ 3M SDE on n + 1 sigmas less the next-to-last one, whose
        # second-order step to a tiny sigma is wasted
        self.discard_next_to_last_sigma = discard_next_to_last_sigma
        self.device = torch.device(device) if device is not None else model.betas.device

    # ------------------------------------------------------------------ schedule
    def denoiser(self, conditioning, unconditional_conditioning=None, unconditional_guidance_scale=1.0, mask=None,
                 x0=None, guidance_rescale=0.0):
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale=guidance_rescale)
        # a zero-terminal-SNR model's last alpha_bar is 0 (sigma infinite): clamped as A1111 and ComfyUI do
        return DiscreteDenoiser(guided, finite_alphas_cumprod(self.model.alphas_cumprod), mask=mask, x0=x0)

    def sigmas_for(self, steps, denoiser):
        """The sigmas [n + 1] of a ``steps``-step run (the user's list, if one was given, whatever ``steps``).

        With ``discard_next_to_last_sigma`` the schedule is made for ``steps + 1`` and loses its
        next-to-last sigma, for txt2img and img2img alike, as A1111 does."""
        if self.user_sigmas is None:
            if self.discard_next_to_last_sigma:
                return self.without_next_to_last(make_sigmas(self.schedule, steps + 1, denoiser, self.device))
            return make_sigmas(self.schedule, steps, denoiser, self.device)
        if steps != len(self.user_sigmas) - 1:
            logger.info("sampling the %d steps of the given sigmas, not %s", len(self.user_sigmas) - 1, steps)
        if float(self.user_sigmas[0]) > denoiser.sigma_max * 1.01:
            logger.warning("the first sigma %.4g is above the model's largest, %.4g", float(self.user_sigmas[0]),
                           denoiser.sigma_max)
        return self.user_sigmas.to(self.device)

    @staticmethod
    def without_next_to_last(sigmas):
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    def img2img_sigmas(self, steps, strength, denoiser):
        """The last int(strength * n) steps of the n-step schedule: sigmas [int(strength * n) + 1]."""
        check_strength(strength)
        sigmas = self.sigmas_for(steps, denoiser)
        n = len(sigmas) - 1
        return sigmas[n - int(strength * n):]

    # ------------------------------------------------------------------ sampling
    def _run(self, denoiser, x, sigmas, callback=None, img_callback=None, progress=True):
        def on_step(info):
            if callback is not None:
                callback(info["i"])
            if img_callback is not None:
                img_callback(info["denoised"], info["i"])

        return K_SAMPLERS[self.sampler](denoiser, x, sigmas, callback=on_step, progress=progress,
                                        **self.sampler_options)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None,
               ucg_schedule=None, progress=True, guidance_rescale=0., **kwargs):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps; returns (samples, None).

        ``mask``/``x0``: where ``mask`` is 1 the known latent ``x0`` is kept (blended into every
        estimate, see ``DiscreteDenoiser``). ``eta`` must be 0: the ancestral and SDE samplers bring
        their own (``sampler_options``)."""
        if eta != 0:
            raise UserError(f"the {self.sampler} sampler takes no eta (got {eta}); its noise is part of the "
                            f"sampler (the ancestral and SDE samplers use eta 1)")
        unsupported = {"normals_sequence": normals_sequence is not None, "quantize_x0": quantize_x0,
                       "temperature": temperature != 1., "noise_dropout": noise_dropout != 0.,
                       "score_corrector": score_corrector is not None, "dynamic_threshold": dynamic_threshold is not None,
                       "ucg_schedule": ucg_schedule is not None}
        if any(unsupported.values()) or kwargs:
            names = [name for name, used in unsupported.items() if used] + sorted(kwargs)
            raise NotImplementedError(f"KDiffusionSampler does not support {', '.join(names)}")
        _check_batch(conditioning, batch_size)
        denoiser = self.denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale, mask, x0,
                                 guidance_rescale)
        sigmas = self.sigmas_for(S, denoiser)
        size = (batch_size, *shape)
        x_T = torch.randn(size, device=self.device) if x_T is None else x_T.to(self.device)
        samples = self._run(denoiser, x_T * sigmas[0], sigmas, callback, img_callback, progress)
        return samples, None

    @torch.no_grad()
    def sample_img2img(self, S, init_latent, strength, conditioning, unconditional_guidance_scale=1.0,
                       unconditional_conditioning=None, noise=None, progress=True, callback=None,
                       guidance_rescale=0.):
        """Re-draw ``init_latent`` [B, C, H, W]: noise it to the level int(strength * S) steps before the
        end of the S-step schedule and sample those steps (strength 0 returns ``init_latent``)."""
        denoiser = self.denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                 guidance_rescale=guidance_rescale)
        sigmas = self.img2img_sigmas(S, strength, denoiser)
        if len(sigmas) == 1:
            return init_latent
        noise = torch.randn_like(init_latent) if noise is None else noise.to(init_latent)
        return self._run(denoiser, init_latent + noise * sigmas[0], sigmas, callback, progress=progress)
