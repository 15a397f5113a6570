"""The samplers by name, and the settings each one accepts.

Every entry point (the generation API, the scripts, the samplers themselves) checks settings
through these functions, so a rule such as "eta only means something to DDIM" lives here once.
"""
import importlib

from ldm.errors import UserError

# name -> (module, class); imported on demand so that asking for DDIM never imports DPM-Solver
SAMPLER_CLASSES = {
    "ddim": ("ldm.models.diffusion.ddim", "DDIMSampler"),
    "plms": ("ldm.models.diffusion.plms", "PLMSSampler"),
    "dpm": ("ldm.models.diffusion.dpm_solver", "DPMSolverSampler"),
}
SAMPLERS = tuple(SAMPLER_CLASSES)
DISPLAY_NAMES = {"ddim": "DDIM", "plms": "PLMS", "dpm": "DPM-Solver++"}
# Samplers whose update draws fresh noise scaled by eta (Song et al. 2021, eq. 16); for the
# others an eta would be silently ignored, so it is refused instead.
TAKES_ETA = ("ddim",)
# Samplers that can start part-way down their schedule from a noised latent (img2img strength).
PARTIAL_SCHEDULE_SAMPLERS = ("ddim",)


def check_sampler(name):
    if name not in SAMPLER_CLASSES:
        raise UserError(f"unknown sampler '{name}'; use one of {', '.join(SAMPLERS)}")


def check_eta(sampler, eta):
    """Refuse an eta the sampler would not use (negative, or non-zero for a deterministic sampler)."""
    if eta < 0:
        raise UserError(f"eta must be 0 or more, got {eta}")
    if eta != 0 and sampler not in TAKES_ETA:
        raise UserError(f"{DISPLAY_NAMES.get(sampler, sampler)} is deterministic and has no eta; "
                        f"eta {eta} applies to DDIM only")


def make_sampler(name, model, device=None):
    """The sampler called ``name`` for ``model``."""
    check_sampler(name)
    module, cls = SAMPLER_CLASSES[name]
    return getattr(importlib.import_module(module), cls)(model, device=device)
