"""The one guided model call that every sampler uses.

``GuidedModel`` wraps ``LatentDiffusion.apply_model`` with classifier-free guidance (Ho & Salimans
2022): out = uncond + scale * (cond - uncond), evaluated as one batch of 2B. The conditioning may
be a tensor, a list of tensors, or a dict of lists (``c_concat`` / ``c_crossattn`` / ``c_adm``).
``eps_and_x0`` turns the raw output of an eps- or v-model into (eps, x0), so update rules never
look at the parameterisation.
"""
import torch

from ldm.models.diffusion import schedule


def _cat_conditioning(uncond, cond):
    """Stack unconditional and conditional conditioning along the batch, whatever their structure."""
    if isinstance(cond, dict):
        return {k: _cat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [_cat_conditioning(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class GuidedModel:
    def __init__(self, model, cond, uncond=None, scale=1.0, score_corrector=None, corrector_kwargs=None):
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = scale
        self.score_corrector = score_corrector
        self.corrector_kwargs = corrector_kwargs or {}

    @property
    def parameterization(self):
        return self.model.parameterization

    @property
    def guided(self):
        return self.uncond is not None and self.scale != 1.0

    def __call__(self, x, t):
        """Guided raw model output (eps or v) for ``x`` [B, ...] at timesteps ``t`` [B] (int or float)."""
        if not self.guided:
            return self.model.apply_model(x, t, self.cond)
        # [2B, ...]: unconditional half first
        out = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), _cat_conditioning(self.uncond, self.cond))
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.scale * (out_cond - out_uncond)

    def eps_and_x0(self, x, t, a, s):
        """Evaluate the model and return (eps, x0); ``a``, ``s`` = sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)."""
        out = self(x, t)
        if self.parameterization == "v":
            eps, x0 = schedule.eps_from_v(x, out, a, s), schedule.x0_from_v(x, out, a, s)
        elif self.parameterization == "x0":
            eps, x0 = schedule.eps_from_x0(x, out, a, s), out
        else:
            eps, x0 = out, schedule.x0_from_eps(x, out, a, s)
        if self.score_corrector is not None:
            if self.parameterization != "eps":
                raise NotImplementedError("score correctors expect an eps-model")
            eps = self.score_corrector.modify_score(self.model, eps, x, t, self.cond, **self.corrector_kwargs)
            x0 = schedule.x0_from_eps(x, eps, a, s)
        return eps, x0
