"""Sigma schedules: ``fn(n, denoiser, device)`` -> descending float32 sigmas [n + 1] ending in 0.

Each is the list of noise levels an n-step sampler visits; the final 0 makes the last step land on
the denoised sample. ``denoiser`` supplies the model's own sigmas (``model_sigmas``, ascending in t)
and their range [sigma_min, sigma_max]. Computed in float64, returned as float32.

``beta`` may return fewer than n steps: like ComfyUI it drops timesteps that round to the same
integer, which starts at about 140 steps.
"""
import itertools
import logging
import math
import re

import numpy as np
import torch

from ldm.errors import UserError

logger = logging.getLogger(__name__)


def _append_zero(sigmas, device):
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def normal(n, denoiser, device="cpu"):
    """The model's own spacing: n timesteps uniform in t from T - 1 down to 0 (k-diffusion's
    ``get_sigmas``, A1111's "Automatic"/ComfyUI's "normal" for SD)."""
    t = torch.linspace(denoiser.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(denoiser.t_to_sigma(t), device)


def karras(n, denoiser, device="cpu", rho=7.0):
    """Karras et al. 2022, eq. (5): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = denoiser.sigma_max ** (1 / rho), denoiser.sigma_min ** (1 / rho)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho, device)


def exponential(n, denoiser, device="cpu"):
    """n sigmas uniform in log sigma from sigma_max to sigma_min."""
    log_sigmas = torch.linspace(math.log(denoiser.sigma_max), math.log(denoiser.sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp(), device)


def polyexponential(n, denoiser, device="cpu", rho=1.0):
    """log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min), ramp from 1 to 0
    (k-diffusion's polyexponential; rho = 1 is the exponential schedule, as A1111 uses it)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(denoiser.sigma_min), math.log(denoiser.sigma_max)
    return _append_zero((log_min + ramp * (log_max - log_min)).exp(), device)


def simple(n, denoiser, device="cpu"):
    """ComfyUI's "simple": every (T / n)-th model sigma counted from the top, t_i = T - 1 - floor(i T / n)."""
    sigmas = denoiser.model_sigmas
    stride = sigmas.shape[0] / n
    return _append_zero([float(sigmas[-(1 + int(i * stride))]) for i in range(n)], device)


# ------------------------------------------------------------------------------------------- beta
def _incomplete_beta(x, a, b):
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz's method),
    using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def beta_quantile(p, a, b):
    """The p-quantile of Beta(a, b), by bisection on the (increasing) CDF to double precision."""
    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2^-60: below float64 resolution near the quantiles used here
        mid = 0.5 * (lo + hi)
        if _incomplete_beta(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta(n, denoiser, device="cpu", alpha=0.6, beta=0.6):
    """ComfyUI's "beta" (from "Beta Sampling is All You Need", Lee et al. 2024): timesteps at the
    Beta(alpha, beta) quantiles of 1, 1 - 1/n, ..., 1/n, rounded to integers; repeats dropped."""
    last = denoiser.num_timesteps - 1
    timesteps = [round(beta_quantile(1.0 - i / n, alpha, beta) * last) for i in range(n)]
    kept = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    if len(kept) < n:
        logger.info("beta schedule: %d of %d timesteps repeat after rounding; sampling %d steps",
                    n - len(kept), n, len(kept))
    return _append_zero([float(denoiser.model_sigmas[t]) for t in kept], device)


# ------------------------------------------------------------------------------- Align Your Steps
# Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models",
# the published 10-step noise levels for Stable Diffusion 1.5 (the project page's "how to" table).
# SD 2.x uses this list too: NVIDIA published lists for SD 1.5, SDXL and SVD only, and SD 2.x shares
# SD 1.5's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, so the same sigma
# range 0.0292..14.61), its latent space (the same f=8 VAE) and U-Net family at 512-768 px, while
# the SDXL list was tuned for a different, larger model at 1024 px.
AYS_SD1_SIGMAS = (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                  0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582)


def loglinear_interp(sigmas, count):
    """``count`` descending values interpolated linearly in log sigma along the ramp of ``sigmas``."""
    ascending_logs = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])
    ramp = np.linspace(0.0, 1.0, len(sigmas))
    return np.exp(np.interp(np.linspace(0.0, 1.0, count), ramp, ascending_logs))[::-1].copy()


def align_your_steps(n, denoiser, device="cpu"):
    """The published 10-step list, log-linearly interpolated to n + 1 levels; the last (sigma_min)
    becomes 0 so that n steps end on the denoised sample (as ComfyUI's AlignYourStepsScheduler)."""
    listed_min, listed_max = AYS_SD1_SIGMAS[-1], AYS_SD1_SIGMAS[0]
    if (abs(denoiser.sigma_max / listed_max - 1) > 0.01 or abs(denoiser.sigma_min / listed_min - 1) > 0.01):
        logger.warning("Align Your Steps was tuned for sigmas %.4g..%.4g but this model's are %.4g..%.4g",
                       listed_min, listed_max, denoiser.sigma_min, denoiser.sigma_max)
    sigmas = loglinear_interp(AYS_SD1_SIGMAS, n + 1)
    return _append_zero(sigmas[:-1], device)


SIGMA_SCHEDULES = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "simple": simple,
    "beta": beta,
    "align_your_steps": align_your_steps,
}


def check_schedule(name):
    if name not in SIGMA_SCHEDULES:
        raise UserError(f"unknown schedule '{name}'; use one of {', '.join(SIGMA_SCHEDULES)}")


def make_sigmas(name, n, denoiser, device="cpu"):
    """The ``name`` schedule for ``n`` steps (``n`` >= 1)."""
    check_schedule(name)
    if int(n) != n or n < 1:
        raise UserError(f"steps must be a positive integer, got {n}")
    return SIGMA_SCHEDULES[name](int(n), denoiser, device)


def sigmas_from_list(text_or_floats):
    """A user's sigmas ("14.6, 7.0, 3.1 0.5" or a sequence of numbers) as a schedule: each a finite
    positive number, strictly descending; a final 0 is appended unless the list already ends in 0."""
    if isinstance(text_or_floats, str):
        items = [item for item in re.split(r"[\s,]+", text_or_floats.strip()) if item]
    else:
        items = list(text_or_floats)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise UserError(f"sigmas: {item!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"sigmas must be finite, got {item!r}")
        values.append(value)
    if values and values[-1] == 0:
        values.pop()
    if not values:
        raise UserError("sigmas must list at least one positive noise level")
    if min(values) <= 0:
        raise UserError(f"sigmas must be positive (only the last may be 0), got {min(values):g}")
    for high, low in itertools.pairwise(values):
        if low >= high:
            raise UserError(f"sigmas must be strictly descending, got {high:g} then {low:g}")
    return _append_zero(values, "cpu")
