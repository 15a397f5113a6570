"""PLMS sampler: DDIM steps driven by a linear multistep estimate of eps (Liu et al. 2022, PNDM)."""
import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import DDIMSampler, _check_batch
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.samplers import check_eta


def multistep_eps(e_t, old_eps):
    """Adams-Bashforth combination of the current and up to three previous eps (PNDM eq. 12)."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


class PLMSSampler(DDIMSampler):
    """Pseudo linear multistep: the DDIM update with eps replaced by a multistep estimate.

    The first step has no history, so it takes a pseudo improved-Euler step: evaluate eps at x_t,
    take a trial DDIM step, evaluate eps there, and use the mean. Works in eps space, so v-models
    are converted to eps first (the official sampler skipped that and treated v as eps).

    At zero terminal SNR (a = 0 at the last timestep, reached with ``timestep_spacing``
    "trailing" or "linspace") x0 = (x_t - s eps) / a is undefined, so the step from there is a
    plain DDIM step with the model's own x0 (v-models give it; eps-models are refused).
    """

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True,
                      timestep_spacing=None):
        check_eta("plms", ddim_eta)
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose,
                              timestep_spacing=timestep_spacing)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None,
               progress=True, timestep_spacing="leading", guidance_rescale=0., **kwargs):
        """As ``DDIMSampler.sample`` (with the same ``timestep_spacing`` and ``guidance_rescale``), eta 0 only."""
        if dynamic_threshold is not None or quantize_x0:
            raise NotImplementedError("dynamic_threshold and quantize_x0 are not supported")
        _check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose, timestep_spacing=timestep_spacing)
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             score_corrector, corrector_kwargs, guidance_rescale=guidance_rescale)
        return self.plms_sampling(guided, (batch_size, *shape), x_T=x_T, callback=callback,
                                  img_callback=img_callback, mask=mask, x0=x0, temperature=temperature,
                                  noise_dropout=noise_dropout, log_every_t=log_every_t, progress=progress)

    @torch.no_grad()
    def plms_sampling(self, guided, shape, x_T=None, callback=None, mask=None, x0=None, img_callback=None,
                      log_every_t=100, temperature=1., noise_dropout=0., progress=True, t_start=None):
        """PLMS from ``x_T`` over the schedule's timesteps, or over its first ``t_start`` of them
        (from the ``t_start``-th DDIM step down: the img2img partial schedule)."""
        b = shape[0]
        img = torch.randn(shape, device=self.device) if x_T is None else x_T.to(self.device)
        timesteps = self.ddim_timesteps if t_start is None else self.ddim_timesteps[:t_start]
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        old_eps = []
        for i, step in enumerate(tqdm(time_range, desc="PLMS Sampler", total=total_steps, disable=not progress)):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=self.device, dtype=torch.long)
            ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]), device=self.device,
                                 dtype=torch.long)
            img = self._keep_known(img, ts, mask, x0)
            guided.step = i
            img, pred_x0, e_t = self._plms_step(guided, img, ts, ts_next, index, old_eps, temperature, noise_dropout)
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
            self._report(i, index, total_steps, img, pred_x0, intermediates, callback, img_callback, log_every_t)
        return img, intermediates

    def _plms_step(self, guided, x, t, t_next, index, old_eps, temperature=1., noise_dropout=0.):
        """Returns (x_prev, x0_hat, eps at x_t); ``old_eps`` holds the eps of earlier steps, oldest first."""
        a_t, a_prev, sigma_t, s_t = self._coefficients(index)
        e_t, x0_t = guided.eps_and_x0(x, t, a_t.sqrt(), s_t)
        if a_t == 0:
            # zero terminal SNR: from pure noise no eps-space step exists (x0 from eps divides by
            # a = 0), so take the first-order DDIM step with the model's own x0; e_t (= x_t for a
            # v-model) starts the multistep history
            x_prev, pred_x0 = self._update(x, e_t, x0_t, a_prev, sigma_t, temperature=temperature,
                                           noise_dropout=noise_dropout)
            return x_prev, pred_x0, e_t

        def ddim_update(eps):
            return self._update(x, eps, schedule.x0_from_eps(x, eps, a_t.sqrt(), s_t), a_prev, sigma_t,
                                temperature=temperature, noise_dropout=noise_dropout)

        if not old_eps:
            x_trial, _ = ddim_update(e_t)
            # eps at the trial point, evaluated with the next step's alpha_bar
            a_n, _, _, s_n = self._coefficients(max(index - 1, 0))
            e_next, _ = guided.eps_and_x0(x_trial, t_next, a_n.sqrt(), s_n)
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = multistep_eps(e_t, old_eps)
        x_prev, pred_x0 = ddim_update(e_prime)
        return x_prev, pred_x0, e_t

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, callback=None, progress=True, guidance_rescale=0.):
        """img2img as ``DDIMSampler.decode``: denoise ``x_latent`` (``stochastic_encode``d to DDIM step
        ``t_start``) with PLMS steps; the history starts afresh with a pseudo improved-Euler step."""
        if use_original_steps:
            raise NotImplementedError("PLMS decodes over the DDIM timesteps of make_schedule only")
        guided = GuidedModel(self.model, cond, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale=guidance_rescale)
        samples, _ = self.plms_sampling(guided, tuple(x_latent.shape), x_T=x_latent, progress=progress,
                                        callback=callback, t_start=t_start)
        return samples
