"""DDIM sampler (Song, Meng & Ermon 2021), with img2img (``stochastic_encode`` / ``decode``)."""
import logging

import numpy as np
import torch
from tqdm import tqdm

from ldm.errors import UserError
from ldm.models.diffusion import schedule
from ldm.models.diffusion.guidance import GuidedModel, conditioning_at
from ldm.modules.diffusionmodules.util import (extract_into_tensor, make_ddim_sampling_parameters,
                                               make_ddim_timesteps, noise_like)

logger = logging.getLogger(__name__)


def _first_tensor(conditioning):
    """The first tensor in a conditioning (dict values and lists in order; None entries skipped)."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning
    items = conditioning.values() if isinstance(conditioning, dict) else \
        conditioning if isinstance(conditioning, list) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _check_batch(conditioning, batch_size):
    conditioning = _first_tensor(conditioning_at(conditioning, 0))
    if conditioning is None:
        return
    if conditioning.shape[0] != batch_size:
        logger.warning("got %d conditionings but batch-size is %d", conditioning.shape[0], batch_size)


class DDIMSampler:
    """Deterministic (eta = 0) to ancestral (eta = 1) DDIM over a subset of the DDPM timesteps.

    Update (Song et al. 2021, eq. 12), with a = alpha_bar (``ddim_alphas``):

        x_{t-1} = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat + sigma_t * z

    ======== ===============================================
    a_t      alpha_bar at the current step (``ddim_alphas``)
    a_prev   alpha_bar at the next, less noisy step
    sigma_t  eta-scaled posterior std (``ddim_sigmas``)
    z        fresh N(0, I) noise, drawn every step, even at eta = 0 (the official RNG order)
    ======== ===============================================

    ``timestep_spacing`` picks the steps (see ``make_ddim_timesteps``): "leading" is the official
    choice, "trailing" starts at the last timestep, as a zero-terminal-SNR model needs (Lin et al.
    2023); there a = 0 and x0_hat comes from the v-model directly (an eps-model is refused).
    """

    def __init__(self, model, schedule="linear", device=None, **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else model.betas.device

    def register_buffer(self, name, attr):
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True,
                      timestep_spacing=None):
        """The DDIM coefficients for ``ddim_num_steps`` steps. ``timestep_spacing`` ("leading",
        "trailing" or "linspace", diffusers' names) or the official ``ddim_discretize`` ("uniform",
        the same as "leading", or "quad") chooses the timesteps."""
        if timestep_spacing is not None and ddim_discretize != "uniform":
            raise UserError(f"give timestep_spacing or ddim_discretize, not both (got {timestep_spacing!r} "
                            f"and {ddim_discretize!r})")
        spacing = ddim_discretize if timestep_spacing is None else timestep_spacing
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=spacing, num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps, verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod.detach().float()
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, "alphas have to be defined for each timestep"
        schedule.check_prediction_at_zero_snr(self.model.parameterization, alphas_cumprod, self.ddim_timesteps,
                                              type(self).__name__, spacing)
        to_float = lambda x: torch.as_tensor(x).detach().to(torch.float32)  # noqa: E731
        ac = alphas_cumprod.cpu().double()
        self.register_buffer("betas", to_float(self.model.betas))
        self.register_buffer("alphas_cumprod", to_float(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_float(self.model.alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_float(ac.sqrt()))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_float((1. - ac).sqrt()))
        self.register_buffer("log_one_minus_alphas_cumprod", to_float((1. - ac).log()))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_float((1. / ac).sqrt()))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_float((1. / ac - 1).sqrt()))

        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums=alphas_cumprod.cpu(),
                                                                    ddim_timesteps=self.ddim_timesteps,
                                                                    eta=ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", to_float(sigmas))
        self.register_buffer("ddim_alphas", to_float(alphas))
        self.register_buffer("ddim_alphas_prev", to_float(alphas_prev))
        self.register_buffer("ddim_sqrt_one_minus_alphas", to_float(torch.sqrt(1. - to_float(alphas))))
        acp = self.model.alphas_cumprod_prev.detach().float()
        self.register_buffer("ddim_sigmas_for_original_num_steps", ddim_eta * torch.sqrt(
            (1 - acp) / (1 - alphas_cumprod) * (1 - alphas_cumprod / acp)).to(self.device))

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None,
               ucg_schedule=None, progress=True, timestep_spacing="leading", guidance_rescale=0., **kwargs):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps; returns (samples, intermediates).

        ``timestep_spacing``: "leading" (official), "trailing" or "linspace" (see make_schedule);
        ``guidance_rescale``: phi of CFG rescale, 0 (plain CFG) to 1 (see guidance.rescale_guidance).
        """
        if dynamic_threshold is not None or ucg_schedule is not None or quantize_x0:
            raise NotImplementedError("dynamic_threshold, ucg_schedule and quantize_x0 are not supported")
        _check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose, timestep_spacing=timestep_spacing)
        size = (batch_size, *shape)
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             score_corrector, corrector_kwargs, guidance_rescale=guidance_rescale)
        return self.ddim_sampling(guided, size, x_T=x_T, callback=callback, img_callback=img_callback, mask=mask,
                                  x0=x0, temperature=temperature, noise_dropout=noise_dropout,
                                  log_every_t=log_every_t, progress=progress)

    @torch.no_grad()
    def ddim_sampling(self, guided, shape, x_T=None, ddim_use_original_steps=False, callback=None,
                      timesteps=None, mask=None, x0=None, img_callback=None, log_every_t=100, temperature=1.,
                      noise_dropout=0., progress=True):
        img = torch.randn(shape, device=self.device) if x_T is None else x_T.to(self.device)
        if timesteps is None:
            timesteps = self.ddpm_num_timesteps if ddim_use_original_steps else self.ddim_timesteps
        elif not ddim_use_original_steps:
            subset_end = int(min(timesteps / self.ddim_timesteps.shape[0], 1) * self.ddim_timesteps.shape[0]) - 1
            timesteps = self.ddim_timesteps[:subset_end]
        time_range = list(reversed(range(0, timesteps))) if ddim_use_original_steps else np.flip(timesteps)
        total_steps = timesteps if ddim_use_original_steps else timesteps.shape[0]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        b = shape[0]
        for i, step in enumerate(tqdm(time_range, desc="DDIM Sampler", total=total_steps, disable=not progress)):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=self.device, dtype=torch.long)
            img = self._keep_known(img, ts, mask, x0)
            guided.step = i
            img, pred_x0 = self._step(guided, img, ts, index, use_original_steps=ddim_use_original_steps,
                                      temperature=temperature, noise_dropout=noise_dropout)
            self._report(i, index, total_steps, img, pred_x0, intermediates, callback, img_callback, log_every_t)
        return img, intermediates

    def _keep_known(self, img, ts, mask, x0):
        """Inpainting by blending: where ``mask`` is 1 the known ``x0``, noised to this step, replaces the sample."""
        if mask is None:
            return img
        assert x0 is not None, "mask needs x0 (the known latent)"
        img_orig = self.model.q_sample(x0, ts)  # draws fresh noise, as officially
        return img_orig * mask + (1. - mask) * img

    @staticmethod
    def _report(i, index, total_steps, img, pred_x0, intermediates, callback, img_callback, log_every_t):
        if callback:
            callback(i)
        if img_callback:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total_steps - 1:
            intermediates["x_inter"].append(img)
            intermediates["pred_x0"].append(pred_x0)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None,
                      guidance_rescale=0.):
        """One DDIM step from ``x`` at DDPM timestep ``t`` (the ``index``-th DDIM step); returns (x_prev, x0)."""
        guided = GuidedModel(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                             score_corrector, corrector_kwargs, guidance_rescale=guidance_rescale)
        return self._step(guided, x, t, index, repeat_noise=repeat_noise, use_original_steps=use_original_steps,
                          temperature=temperature, noise_dropout=noise_dropout)

    # ------------------------------------------------------------------ the update rule
    def _coefficients(self, index, use_original_steps=False):
        """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) of step ``index`` as 0-dim float32 tensors."""
        if use_original_steps:
            return (self.alphas_cumprod[index], self.alphas_cumprod_prev[index],
                    self.ddim_sigmas_for_original_num_steps[index], self.sqrt_one_minus_alphas_cumprod[index])
        return (self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index],
                self.ddim_sqrt_one_minus_alphas[index])

    def _step(self, guided, x, t, index, repeat_noise=False, use_original_steps=False, temperature=1.,
              noise_dropout=0.):
        a_t, a_prev, sigma_t, sqrt_one_minus_at = self._coefficients(index, use_original_steps)
        e_t, pred_x0 = guided.eps_and_x0(x, t, a_t.sqrt(), sqrt_one_minus_at)
        return self._update(x, e_t, pred_x0, a_prev, sigma_t, repeat_noise, temperature, noise_dropout)

    def _update(self, x, e_t, pred_x0, a_prev, sigma_t, repeat_noise=False, temperature=1., noise_dropout=0.):
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * noise_like(x.shape, x.device, repeat_noise) * temperature
        if noise_dropout > 0.:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0

    # ------------------------------------------------------------------ img2img
    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """Noise ``x0`` to DDIM step index ``t`` [B] in one jump (img2img start point)."""
        if use_original_steps:
            sqrt_ac, sqrt_1m_ac = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_ac, sqrt_1m_ac = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn_like(x0)
        t = t.to(sqrt_ac.device)
        return (extract_into_tensor(sqrt_ac, t, x0.shape).to(x0) * x0
                + extract_into_tensor(sqrt_1m_ac, t, x0.shape).to(x0) * noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, callback=None, progress=True, guidance_rescale=0.):
        """Denoise ``x_latent`` from DDIM step index ``t_start`` down to 0 (img2img), over the
        timesteps of the last ``make_schedule`` (and its ``timestep_spacing``)."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        timesteps = timesteps[:t_start]
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        guided = GuidedModel(self.model, cond, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale=guidance_rescale)
        x_dec = x_latent
        for i, step in enumerate(tqdm(time_range, desc="Decoding image", total=total_steps, disable=not progress)):
            index = total_steps - i - 1
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            guided.step = i
            x_dec, _ = self._step(guided, x_dec, ts, index, use_original_steps=use_original_steps)
            if callback:
                callback(i)
        return x_dec
