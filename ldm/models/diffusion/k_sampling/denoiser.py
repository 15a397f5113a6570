"""A discrete-time eps- or v-model seen as a denoiser D(x; sigma) in the sigma formulation.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") write
every diffusion model as x = x0 + sigma * n and sample with the denoiser D(x; sigma) ~ x0. A DDPM
model instead sees x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, the same point scaled by
c_in = 1 / sqrt(sigma^2 + 1), with sigma^2 = (1 - alpha_bar) / alpha_bar (Karras et al., Table 1,
"VP"). So D(x; sigma) = the model's x0 estimate at input c_in * x and timestep t(sigma).

======== ==================================================================
sigma    noise level of x = x0 + sigma * n (the sampler's variable)
t        fractional model timestep: log sigma interpolated over the model's sigmas
c_in     1 / sqrt(sigma^2 + 1) = sqrt(alpha_bar): scales x to the model's x_t
eps      eps-model: D = x - sigma * eps
v        v-model (Salimans & Ho 2022): D = c_in^2 * x - sigma * c_in * v
======== ==================================================================
"""
import torch

from ldm.errors import UserError


def set_step(denoiser, i):
    """Tell ``denoiser`` that its next evaluations belong to sampling step ``i`` (its conditioning may
    change over the steps: prompt editing); a plain function as denoiser is left alone."""
    hook = getattr(denoiser, "set_step", None)
    if hook is not None:
        hook(i)


class DiscreteDenoiser:
    """D(x; sigma) for ``guided`` (a ``GuidedModel``: the CFG-combined eps or v output for (x_t, t)).

    ``mask``/``x0`` blend a known latent into every estimate (inpainting by blending): where ``mask``
    is 1 the estimate is replaced by ``x0``, so the sampler carries the known region as x0 noised
    with the sampler's own noise, and ends on it exactly.
    """

    def __init__(self, guided, alphas_cumprod, mask=None, x0=None):
        if mask is not None and x0 is None:
            raise UserError("mask needs x0 (the known latent)")
        self.guided = guided
        self.parameterization = guided.parameterization
        if self.parameterization not in ("eps", "v", "x0"):
            raise UserError(f"unknown parameterization {self.parameterization!r} (use eps, v or x0)")
        acp = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        # ascending in t; float64 so that sigma -> t -> sigma round-trips to ~1e-12
        self.model_sigmas = ((1 - acp) / acp).sqrt()
        self.log_sigmas = self.model_sigmas.log()
        self.mask = mask
        self.x0 = x0

    def set_step(self, i):
        self.guided.step = i

    @property
    def num_timesteps(self):
        return self.model_sigmas.shape[0]

    @property
    def sigma_min(self):
        return float(self.model_sigmas[0])

    @property
    def sigma_max(self):
        return float(self.model_sigmas[-1])

    def sigma_to_t(self, sigma):
        """Fractional timestep(s) of ``sigma`` (float or tensor), linear in log sigma between the
        model's sigmas and clamped to [0, T - 1]; float64 tensor on the CPU."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().log()
        # index of the last model sigma <= sigma, kept one below the end so that high = low + 1 exists
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(torch.float64) + w

    def t_to_sigma(self, t):
        """Sigma(s) of fractional timestep(s) ``t``: the inverse of ``sigma_to_t`` (float64, CPU)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def __call__(self, x, sigma):
        """The x0 estimate for ``x`` [B, C, H, W] at noise level ``sigma`` (float, 0-dim or [B])."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        s = sigma.to(device=x.device, dtype=x.dtype).reshape(batch, *([1] * (x.ndim - 1)))  # [B, 1, 1, 1]
        c_in = (s ** 2 + 1).rsqrt()
        out = self.guided(x * c_in, t).to(x.dtype)
        if self.parameterization == "eps":
            denoised = x - s * out
        elif self.parameterization == "v":
            # x_t = c_in x; x0 = sqrt(ab) x_t - sqrt(1 - ab) v with sqrt(ab) = c_in, sqrt(1 - ab) = sigma c_in
            denoised = c_in ** 2 * x - s * c_in * out
        else:
            denoised = out
        if self.mask is not None:
            denoised = self.mask * self.x0 + (1 - self.mask) * denoised
        return denoised
