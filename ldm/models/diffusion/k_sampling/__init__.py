"""Samplers in the sigma formulation (Karras et al. 2022) over a discrete eps- or v-model.

``DiscreteDenoiser`` turns the guided model into D(x; sigma); ``SIGMA_SCHEDULES`` (or
``sigmas_from_list``) give the noise levels; ``K_SAMPLERS`` are the update rules, each
``fn(denoiser, x, sigmas, *, callback=None, progress=True, ...) -> x``. The ``sample(...)``
interface of the other samplers is ``ldm.models.diffusion.k_sampler.KDiffusionSampler``.
"""
from .denoiser import DiscreteDenoiser
from .noise import BrownianTreeNoise, GaussianNoise, draw_seed
from .samplers import (
    BROWNIAN_SAMPLERS,
    K_SAMPLERS,
    STOCHASTIC_SAMPLERS,
    TWO_EVALUATIONS_PER_STEP,
    ancestral_step,
    to_d,
)
from .schedules import SIGMA_SCHEDULES, check_schedule, make_sigmas, sigmas_from_list

__all__ = [
    "BROWNIAN_SAMPLERS", "K_SAMPLERS", "SIGMA_SCHEDULES", "STOCHASTIC_SAMPLERS", "TWO_EVALUATIONS_PER_STEP",
    "BrownianTreeNoise", "DiscreteDenoiser", "GaussianNoise", "ancestral_step", "check_schedule", "draw_seed",
    "make_sigmas", "sigmas_from_list", "to_d",
]
