"""The ``DPMSolverSampler`` interface (official signature) over DPM-Solver++ and the shared guided call.

DPM-Solver keeps its own schedule, uniform in continuous time from t = 1 (the last training
timestep) to 1/N; it takes no ``timestep_spacing``. Since it always starts at the last timestep, a
zero-terminal-SNR model (alpha_bar_T = 0) runs on ``schedule.finite_alphas_cumprod`` (log alpha
and the log-SNR must be finite) and gives x0 directly; an eps-model is refused there.
"""
import torch
from tqdm import tqdm

from ldm.errors import UserError
from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import _check_batch
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.samplers import check_eta, check_strength

from .dpm_solver import DPMSolverPP, NoiseScheduleVP


class DPMSolverSampler:
    def __init__(self, model, device=None, **kwargs):
        self.model = model
        self.device = torch.device(device) if device is not None else model.betas.device
        self.alphas_cumprod = model.alphas_cumprod.detach().float().to(self.device)
        self.zero_terminal_snr = schedule.has_zero_terminal_snr(self.alphas_cumprod)

    def noise_schedule(self):
        """The model's schedule made continuous; at zero terminal SNR its last alpha_bar is clamped
        (``schedule.finite_alphas_cumprod``) so that log alpha and the log-SNR lambda stay finite."""
        return NoiseScheduleVP("discrete", alphas_cumprod=schedule.finite_alphas_cumprod(self.alphas_cumprod))

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, progress=True, order=2,
               timestep_spacing=None, guidance_rescale=0., **kwargs):
        """Multistep DPM-Solver++ (order 2, time-uniform, lower order at the end); returns (samples, None).

        ``guidance_rescale`` as for DDIM; ``timestep_spacing`` must stay None (see the module docstring).
        """
        check_eta("dpm", eta)
        if timestep_spacing is not None:
            raise UserError(f"DPM-Solver steps uniformly in time from the last timestep and takes no "
                            f"timestep_spacing (got {timestep_spacing!r}); spacings apply to DDIM and PLMS")
        if mask is not None and x0 is None:
            raise UserError("mask needs x0 (the known latent)")
        if self.zero_terminal_snr:
            schedule.check_prediction_at_zero_snr(
                self.model.parameterization, self.alphas_cumprod, [len(self.alphas_cumprod) - 1], "DPM-Solver",
                advice="use a v-prediction model, or DDIM or PLMS with timestep_spacing 'leading'")
        _check_batch(conditioning, batch_size)
        size = (batch_size, *shape)
        img = torch.randn(size, device=self.device) if x_T is None else x_T.to(self.device)
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             score_corrector, corrector_kwargs, guidance_rescale=guidance_rescale)
        x = self._solve(guided, img, S, order, callback, progress, mask=mask, known=x0)
        return x.to(self.device), None

    def _solve(self, guided, x, steps, order=2, callback=None, progress=True, t_start=None, mask=None, known=None):
        """``steps`` solver steps from ``x``; where ``mask`` is 1 every data prediction is replaced by
        ``known`` (inpainting by blending, as the sigma samplers do), so the run ends on it exactly."""
        evaluations = 0

        def blend(x0):
            return x0 if mask is None else mask * known + (1 - mask) * x0

        def data_fn(x, t_model, alpha_t, sigma_t):
            nonlocal evaluations
            # multistep: exactly one evaluation per step, at the step's start (prompt editing's step index)
            guided.step = evaluations
            evaluations += 1
            a, s = alpha_t.reshape(-1, 1, 1, 1), sigma_t.reshape(-1, 1, 1, 1)
            eps, x0 = guided.eps_and_x0(x, t_model, a, s)
            if self.zero_terminal_snr:
                # near alpha_bar = 0, (x - s eps) / a would amplify rounding by 1 / a (~4500)
                return blend(x0)
            # eps first, then x0 from it: the official wrapper converts v to eps and the solver eps to x0
            return blend(schedule.x0_from_eps(x, eps, a, s))

        solver = DPMSolverPP(data_fn, self.noise_schedule())
        progress_iter = (lambda it: tqdm(it, desc="DPM-Solver++", total=steps)) if progress else None
        return solver.sample(x, steps=steps, order=order, lower_order_final=True, callback=callback,
                             progress_iter=progress_iter, t_start=t_start)

    @torch.no_grad()
    def sample_img2img(self, S, init_latent, strength, conditioning, unconditional_guidance_scale=1.0,
                       unconditional_conditioning=None, noise=None, progress=True, callback=None,
                       guidance_rescale=0., order=2):
        """Re-draw ``init_latent`` [B, C, H, W]: noise it to the time int(strength * S) steps before the
        end of the S-step time grid and solve those steps (strength 0 returns ``init_latent``)."""
        check_strength(strength)
        steps = int(strength * S)
        if steps == 0:
            return init_latent
        ns = self.noise_schedule()
        t_start = DPMSolverPP(None, ns).time_grid(S)[S - steps].reshape(1)
        if self.zero_terminal_snr and strength == 1.0:
            schedule.check_prediction_at_zero_snr(
                self.model.parameterization, self.alphas_cumprod, [len(self.alphas_cumprod) - 1], "DPM-Solver",
                advice="use a v-prediction model, or a strength below 1")
        noise = torch.randn_like(init_latent) if noise is None else noise.to(init_latent)
        alpha, sigma = (v.to(init_latent).reshape(1, 1, 1, 1) for v in (ns.marginal_alpha(t_start),
                                                                          ns.marginal_std(t_start)))
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale=guidance_rescale)
        return self._solve(guided, alpha * init_latent + sigma * noise, steps, order, callback, progress,
                           t_start=t_start)
