"""The one guided model call that every sampler uses.

``GuidedModel`` wraps ``LatentDiffusion.apply_model`` with classifier-free guidance (Ho & Salimans
2022): out = uncond + scale * (cond - uncond), evaluated as one batch of 2B. The conditioning may
be a tensor, a list of tensors, or a dict of lists (``c_concat`` / ``c_crossattn`` / ``c_adm``); an
entry that only the conditional side has (ControlNet's guess mode: no control for the unconditional
half) reaches the model as a ``PartialConditioning`` of the conditional rows.
``eps_and_x0`` turns the raw output of an eps- or v-model into (eps, x0), so update rules never
look at the parameterisation. ``guidance_rescale`` (Lin et al. 2023) tempers the guided output's
scale: see :func:`rescale_guidance`.

Prompt editing and alternation make the conditioning change over the steps: a
``ScheduledConditioning`` anywhere in ``cond``/``uncond`` is resolved to the tensor of the sampler's
current step, ``GuidedModel.step``, which every sampler sets as it advances (0 for its first step;
the extra evaluations of a second-order step belong to that step).

What follows a sampling run on the model side (``ldm.modules.speedups``: step caching, token merging) sits
in the model's ``run_listeners``: each hears ``start_run()`` when a guided model is made for a run and
``at_step(step)`` before every evaluation.
"""
import torch

from ldm.errors import UserError
from ldm.models.diffusion import schedule
from ldm.modules.partial_conditioning import PartialConditioning


def _cat_conditioning(uncond, cond, halves):
    """Stack unconditional and conditional conditioning along the batch, whatever their structure.

    ``halves`` = (rows of the unconditional half, rows of the conditional half). Dicts are stacked
    key by key; an entry one side lacks (None or absent there) becomes a ``PartialConditioning`` of
    the other side's rows. Conditioning objects other than tensors stack themselves:
    ``cond.cat_batch(uncond)``.
    """
    if isinstance(cond, dict) and isinstance(uncond, dict):
        keys = dict.fromkeys([*cond, *uncond])
        return {k: _cat_conditioning(uncond.get(k), cond.get(k), halves) for k in keys}
    if uncond is None and cond is None:
        return None
    if uncond is None or cond is None:
        rows = halves[1] if uncond is None else halves[0]
        return PartialConditioning(cond if uncond is None else uncond, slice(*rows))
    if isinstance(cond, list) and isinstance(uncond, list):
        if len(cond) != len(uncond):
            raise ValueError(f"conditional and unconditional conditioning lists differ in length "
                             f"({len(cond)} vs {len(uncond)}); put None where one side has no entry")
        return [_cat_conditioning(u, c, halves) for u, c in zip(uncond, cond)]
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    return cond.cat_batch(uncond)


def conditioning_at(cond, step):
    """``cond`` with every ``ScheduledConditioning`` in it replaced by its tensor for step ``step`` (any
    object with ``at(step)`` resolves itself: a ControlNet hint is None outside its step range)."""
    if isinstance(cond, dict):
        return {k: conditioning_at(v, step) for k, v in cond.items()}
    if isinstance(cond, list):
        return [conditioning_at(c, step) for c in cond]
    at = getattr(cond, "at", None)
    return at(step) if at is not None else cond


def rescale_guidance(guided, cond, phi):
    """CFG rescale (Lin et al. 2023, sec. 3.4, eq. 15-16), as diffusers' ``rescale_noise_cfg``.

    The rescaled quantity is the model's raw output, whatever it predicts (eps, v or x0): the
    guided output ``guided`` [B, ...] is scaled per sample to the standard deviation of the
    conditional output ``cond`` [B, ...], then mixed back with weight ``phi``:

        rescaled = guided * std(cond) / std(guided);   out = phi * rescaled + (1 - phi) * guided

    phi = 0 is plain CFG; the paper uses 0.7 with its zero-terminal-SNR v-models.
    """
    dims = list(range(1, guided.ndim))  # std over everything but the batch
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class GuidedModel:
    def __init__(self, model, cond, uncond=None, scale=1.0, score_corrector=None, corrector_kwargs=None,
                 guidance_rescale=0.0):
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale}")
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = scale
        self.score_corrector = score_corrector
        self.corrector_kwargs = corrector_kwargs or {}
        self.guidance_rescale = guidance_rescale
        self.step = 0
        self.listeners = tuple(getattr(model, "run_listeners", ()))
        for listener in self.listeners:
            listener.start_run()

    @property
    def parameterization(self):
        return self.model.parameterization

    @property
    def guided(self):
        return self.uncond is not None and self.scale != 1.0

    def __call__(self, x, t):
        """Guided raw model output (eps or v) for ``x`` [B, ...] at timesteps ``t`` [B] (int or float)."""
        for listener in self.listeners:
            listener.at_step(self.step)
        cond = conditioning_at(self.cond, self.step)
        if not self.guided:
            return self.model.apply_model(x, t, cond)
        # [2B, ...]: unconditional half first
        uncond = conditioning_at(self.uncond, self.step)
        n = x.shape[0]
        out = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]),
                                     _cat_conditioning(uncond, cond, ((0, n), (n, 2 * n))))
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.guidance_rescale == 0:
            return guided
        return rescale_guidance(guided, out_cond, self.guidance_rescale)

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
            eps = self.score_corrector.modify_score(self.model, eps, x, t, conditioning_at(self.cond, self.step),
                                                    **self.corrector_kwargs)
            x0 = schedule.x0_from_eps(x, eps, a, s)
        return eps, x0
