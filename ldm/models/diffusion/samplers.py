"""The samplers by name, and the settings each one accepts.

Every entry point (the generation API, the scripts, the samplers themselves) checks settings
through these functions, so a rule such as "eta only means something to DDIM" lives here once.

Names follow the web UIs people use: each sampler has an id (``dpmpp_2m``), AUTOMATIC1111's label
(``DPM++ 2M``, written into PNG metadata) and aliases (A1111's ``k_dpmpp_2m``); input matches any
of them, case-insensitively. A sampler of the sigma formulation (``ldm.models.diffusion.k_sampling``)
runs on a sigma schedule (A1111's "Schedule type"); DDIM, PLMS and DPM-Solver++ walk the model's
own timesteps and take none.
"""
import importlib
from dataclasses import dataclass

from ldm.errors import UserError


@dataclass(frozen=True)
class SamplerInfo:
    name: str                    # our id
    label: str                   # A1111's label
    default_schedule: str = ""   # "" for the timestep samplers (no sigma schedule)
    aliases: tuple = ()
    # options the sampler function gets (e.g. DPM++ 2M SDE Heun's solver type)
    options: tuple = ()
    discard_next_to_last_sigma: bool = False   # as A1111 runs it
    function: str = ""           # the k_sampling function, when it is not ``name``

    @property
    def uses_sigmas(self):
        return bool(self.default_schedule)


# A1111's labels and the schedule each sampler uses when none is asked for ("Automatic")
SAMPLER_INFO = (
    SamplerInfo("ddim", "DDIM"),
    SamplerInfo("plms", "PLMS"),
    SamplerInfo("dpm", "DPM-Solver++", aliases=("dpm_solver", "dpm-solver")),
    SamplerInfo("euler", "Euler", "normal", ("k_euler",)),
    SamplerInfo("euler_ancestral", "Euler a", "normal", ("k_euler_a", "k_euler_ancestral")),
    SamplerInfo("heun", "Heun", "normal", ("k_heun",)),
    SamplerInfo("dpm_2", "DPM2", "karras", ("k_dpm_2",), discard_next_to_last_sigma=True),
    SamplerInfo("dpm_2_ancestral", "DPM2 a", "karras", ("k_dpm_2_a",), discard_next_to_last_sigma=True),
    SamplerInfo("lms", "LMS", "normal", ("k_lms",)),
    SamplerInfo("dpmpp_2m", "DPM++ 2M", "karras", ("k_dpmpp_2m",)),
    SamplerInfo("dpmpp_2s_ancestral", "DPM++ 2S a", "karras", ("k_dpmpp_2s_a",)),
    SamplerInfo("dpmpp_sde", "DPM++ SDE", "karras", ("k_dpmpp_sde",)),
    SamplerInfo("dpmpp_2m_sde", "DPM++ 2M SDE", "exponential", ("k_dpmpp_2m_sde",)),
    SamplerInfo("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", "exponential", ("k_dpmpp_2m_sde_heun",),
                options=(("solver_type", "heun"),), function="dpmpp_2m_sde"),
    SamplerInfo("dpmpp_3m_sde", "DPM++ 3M SDE", "exponential", ("k_dpmpp_3m_sde",), discard_next_to_last_sigma=True),
    SamplerInfo("unipc_bh1", "UniPC", "normal", ("unipc", "uni_pc")),
    SamplerInfo("unipc_bh2", "UniPC bh2", "normal", ("uni_pc_bh2",)),
    SamplerInfo("ddpm", "DDPM", "normal"),
    SamplerInfo("lcm", "LCM", "normal"),
)
SAMPLER_BY_NAME = {info.name: info for info in SAMPLER_INFO}
SAMPLERS = tuple(SAMPLER_BY_NAME)
DISPLAY_NAMES = {info.name: info.label for info in SAMPLER_INFO}

# schedule id -> A1111's "Schedule type" label
SCHEDULE_LABELS = {
    "normal": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "simple": "Simple", "beta": "Beta",
    "align_your_steps": "Align Your Steps",
}
AUTOMATIC = "automatic"
SCHEDULE_ALIASES = {"uniform": "normal", "ays": "align_your_steps"}

# Samplers whose update draws fresh noise scaled by eta (Song et al. 2021, eq. 16); for the
# others an eta would be silently ignored, so it is refused instead.
TAKES_ETA = ("ddim",)


def _key(text):
    return " ".join(str(text).replace("_", " ").replace("-", " ").lower().split())


_LOOKUP = {_key(text): info.name for info in SAMPLER_INFO for text in (info.name, info.label, *info.aliases)}
_SCHEDULE_LOOKUP = {**{_key(k): k for k in SCHEDULE_LABELS}, **{_key(v): k for k, v in SCHEDULE_LABELS.items()},
                    **{_key(k): v for k, v in SCHEDULE_ALIASES.items()}, _key(AUTOMATIC): AUTOMATIC}


def resolve_sampler(text):
    """Our sampler id for any of its names ("Euler a", "k_euler_a", "euler_ancestral", ...).

    A1111's older combined names ("DPM++ 2M Karras") are split into sampler and schedule: the
    result is then ``(sampler, schedule)``; otherwise ``(sampler, None)``.
    """
    key = _key(text)
    if key in _LOOKUP:
        return _LOOKUP[key], None
    for schedule_key, schedule in _SCHEDULE_LOOKUP.items():
        if schedule != AUTOMATIC and key.endswith(" " + schedule_key) and key[:-len(schedule_key) - 1] in _LOOKUP:
            return _LOOKUP[key[:-len(schedule_key) - 1]], schedule
    raise UserError(f"unknown sampler '{text}'; use one of {', '.join(DISPLAY_NAMES.values())}")


def resolve_schedule(text):
    """Our schedule id for a schedule name ("Karras", "align your steps", ...), or "automatic"."""
    key = _key(text)
    if key not in _SCHEDULE_LOOKUP:
        raise UserError(f"unknown schedule '{text}'; use one of Automatic, {', '.join(SCHEDULE_LABELS.values())}")
    return _SCHEDULE_LOOKUP[key]


def check_sampler(name):
    if name not in SAMPLER_BY_NAME:
        raise UserError(f"unknown sampler '{name}'; use one of {', '.join(SAMPLERS)}")


def check_strength(strength):
    """img2img strength: the share of the schedule to re-run, 0 (keep the image) to 1 (from noise)."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be from 0.0 to 1.0, got {strength}")


def check_eta(sampler, eta):
    """Refuse an eta the sampler would not use (negative, or non-zero for a deterministic sampler)."""
    if eta < 0:
        raise UserError(f"eta must be 0 or more, got {eta}")
    if eta != 0 and sampler not in TAKES_ETA:
        raise UserError(f"{DISPLAY_NAMES.get(sampler, sampler)} has no eta (it is deterministic or "
                        f"brings its own noise); eta {eta} applies to DDIM only")


def schedule_for(sampler, schedule=None, sigmas=None):
    """The sigma schedule id a run uses: the one asked for, else the sampler's default; None for
    the timestep samplers, which refuse a schedule or sigmas."""
    info = SAMPLER_BY_NAME[sampler]
    asked = None if schedule in (None, AUTOMATIC) else schedule
    if not info.uses_sigmas:
        if asked is not None or sigmas is not None:
            raise UserError(f"{info.label} walks the model's own timesteps: a sigma schedule or sigmas "
                            f"need a sampler of the sigma formulation (Euler, DPM++ 2M, ...)")
        return None
    if asked is not None and asked not in SCHEDULE_LABELS:
        raise UserError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULE_LABELS)}")
    return asked or info.default_schedule


def sampler_label(sampler, schedule=None, sigmas=None):
    """(Sampler, Schedule type) as A1111 writes them in the ``parameters`` text."""
    resolved = schedule_for(sampler, schedule, sigmas)
    if sigmas is not None:
        return DISPLAY_NAMES[sampler], "Custom sigmas"
    return DISPLAY_NAMES[sampler], SCHEDULE_LABELS.get(resolved)


def make_sampler(name, model, device=None, *, schedule=None, sigmas=None):
    """The sampler called ``name`` for ``model``; sigma samplers on ``schedule`` or ``sigmas``."""
    check_sampler(name)
    resolved = schedule_for(name, schedule, sigmas)
    if resolved is None:
        module, cls = {"ddim": ("ldm.models.diffusion.ddim", "DDIMSampler"),
                       "plms": ("ldm.models.diffusion.plms", "PLMSSampler"),
                       "dpm": ("ldm.models.diffusion.dpm_solver", "DPMSolverSampler")}[name]
        return getattr(importlib.import_module(module), cls)(model, device=device)
    from ldm.models.diffusion.k_sampler import KDiffusionSampler
    info = SAMPLER_BY_NAME[name]
    return KDiffusionSampler(model, sampler=info.function or name, schedule=resolved, sigmas=sigmas, device=device,
                             sampler_options=dict(info.options),
                             discard_next_to_last_sigma=info.discard_next_to_last_sigma)
