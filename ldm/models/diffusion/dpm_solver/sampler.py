"""The ``DPMSolverSampler`` interface (official signature) over DPM-Solver++ and the shared guided call."""
import torch
from tqdm import tqdm

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import _check_batch
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.samplers import check_eta

from .dpm_solver import DPMSolverPP, NoiseScheduleVP


class DPMSolverSampler:
    def __init__(self, model, device=None, **kwargs):
        self.model = model
        self.device = torch.device(device) if device is not None else model.betas.device
        self.alphas_cumprod = model.alphas_cumprod.detach().float().to(self.device)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, progress=True, order=2, **kwargs):
        """Multistep DPM-Solver++ (order 2, time-uniform, lower order at the end); returns (samples, None)."""
        check_eta("dpm", eta)
        if mask is not None:
            raise NotImplementedError("DPM-Solver does not support mask/x0 blending; use DDIM for inpainting")
        _check_batch(conditioning, batch_size)
        size = (batch_size, *shape)
        img = torch.randn(size, device=self.device) if x_T is None else x_T.to(self.device)
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             score_corrector, corrector_kwargs)

        def data_fn(x, t_model, alpha_t, sigma_t):
            a, s = alpha_t.reshape(-1, 1, 1, 1), sigma_t.reshape(-1, 1, 1, 1)
            # eps first, then x0 from it: the official wrapper converts v to eps and the solver eps to x0
            eps, _ = guided.eps_and_x0(x, t_model, a, s)
            return schedule.x0_from_eps(x, eps, a, s)

        solver = DPMSolverPP(data_fn, NoiseScheduleVP("discrete", alphas_cumprod=self.alphas_cumprod))
        progress_iter = (lambda it: tqdm(it, desc="DPM-Solver++", total=S)) if progress else None
        x = solver.sample(img, steps=S, order=order, lower_order_final=True, callback=callback,
                          progress_iter=progress_iter)
        return x.to(self.device), None
