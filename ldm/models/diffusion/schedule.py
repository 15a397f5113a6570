"""The DDPM forward-process schedule and the x0 / eps / v algebra, as pure functions.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):

    alpha_bar_t   cumulative product of (1 - beta)        x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    v             sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
    a, s          sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) broadcast to the sample's shape

The buffers are computed in float64 and stored as float32, exactly as the official code stores
them in every checkpoint.

Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"): :func:`rescale_zero_terminal_snr` makes alpha_bar end at exactly 0, so x_T is pure noise.
There a = 0: x0 = (x_t - s eps) / a and sigma = s / a are undefined, which is why the paper pairs
it with v-prediction (x0 = a x_t - s v needs no division). Samplers that need a finite sigma use
:func:`finite_alphas_cumprod`.
"""
import numpy as np
import torch

from ldm.errors import UserError

# The terminal alpha_bar that A1111 and ComfyUI put in place of 0 for samplers that need a finite
# sigma = sqrt((1 - alpha_bar) / alpha_bar) (about 4519 here; diffusers uses 2**-24, sigma 4096).
TERMINAL_ALPHA_BAR_FLOOR = 4.8973451890853435e-08

# Persistent buffers, in the official registration order (they are checkpoint keys).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_buffers(betas, v_posterior=0.0):
    """All persistent schedule buffers for ``betas`` (float64 numpy) as float32 tensors.

    With zero terminal SNR (alpha_bar_T = 0) the last ``sqrt_recip_alphas_cumprod`` and
    ``sqrt_recipm1_alphas_cumprod`` are inf: x0 from eps is undefined there.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Posterior q(x_{t-1} | x_t, x0); v_posterior interpolates its variance towards beta_t.
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          + v_posterior * betas)
    with np.errstate(divide="ignore"):  # 1 / alpha_bar_T at zero terminal SNR, see above
        recip_alphas_cumprod = 1.0 / alphas_cumprod
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(recip_alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(recip_alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, so the log is clipped
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    # device="cpu" keeps the schedule real even when the model is built under a meta-device context
    return {k: torch.tensor(values[k], dtype=torch.float32, device="cpu") for k in SCHEDULE_BUFFERS}


def rescale_zero_terminal_snr(betas):
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1); float64 numpy in and out.

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first value is
    unchanged; the betas are then recovered from the ratios of consecutive alpha_bar (so beta_T = 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    alphas = np.append(alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1])
    return 1.0 - alphas


def has_zero_terminal_snr(alphas_cumprod):
    """True when the last alpha_bar is exactly 0 (a zero-terminal-SNR schedule)."""
    return bool(alphas_cumprod[-1] == 0)


def finite_alphas_cumprod(alphas_cumprod, floor=TERMINAL_ALPHA_BAR_FLOOR):
    """``alphas_cumprod`` (a tensor) with a zero last value replaced by ``floor``; the same values
    otherwise. For samplers that work with sigma = sqrt((1 - alpha_bar) / alpha_bar) or
    log(alpha_bar), which are infinite at zero terminal SNR (A1111 and ComfyUI do the same)."""
    if not has_zero_terminal_snr(alphas_cumprod):
        return alphas_cumprod
    out = alphas_cumprod.clone()
    out[-1] = floor
    return out


def check_prediction_at_zero_snr(parameterization, alphas_cumprod, timesteps, sampler, spacing=None,
                                 advice="use timestep_spacing 'leading' or a v-prediction model"):
    """Refuse an eps-model on a step where alpha_bar is 0: its x0 = (x_t - s eps) / a divides by 0.

    ``timesteps`` are the DDPM timesteps the ``sampler`` (a name for the message, with its
    ``spacing`` if any) will evaluate; ``advice`` ends the message. v- and x0-models give x0
    directly, so they are fine.
    """
    if parameterization != "eps":
        return
    visited = torch.as_tensor(np.asarray(timesteps, dtype=np.int64))
    at_zero = visited[torch.as_tensor(alphas_cumprod).cpu()[visited] == 0]
    if len(at_zero):
        how = f" with timestep_spacing '{spacing}'" if spacing else ""
        raise UserError(f"{sampler}{how} evaluates the model at timestep {int(at_zero[0])}, where alpha_bar "
                        f"is 0 (zero terminal SNR), and an eps-prediction model cannot give x0 there; {advice}")


def lvlb_weights(buffers, parameterization):
    """Per-timestep weights of the variational bound term of the loss (not saved in checkpoints).

    Computed from the float32 buffers, as the official code does, so the values agree exactly.
    """
    betas = buffers["betas"]
    alphas = torch.tensor(1.0 - betas.double().numpy(), dtype=torch.float32, device="cpu")
    if parameterization == "eps":
        w = betas ** 2 / (2 * buffers["posterior_variance"] * alphas * (1 - buffers["alphas_cumprod"]))
    elif parameterization == "x0":
        ac = buffers["alphas_cumprod"]
        w = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)
    elif parameterization == "v":
        w = torch.ones(betas.shape, dtype=torch.float32, device="cpu")
    else:
        raise NotImplementedError(f"parameterization {parameterization!r} (use eps, x0 or v)")
    w = w.clone()
    w[0] = w[1]  # t = 0 divides by a zero posterior variance
    return w


# ----------------------------------------------------------------------------- algebra
def q_sample(x0, eps, a, s):
    """x_t = a x0 + s eps."""
    return a * x0 + s * eps


def v_from_x0_eps(x0, eps, a, s):
    """v = a eps - s x0."""
    return a * eps - s * x0


def x0_from_eps(x_t, eps, a, s):
    """x0 = (x_t - s eps) / a."""
    return (x_t - s * eps) / a


def x0_from_v(x_t, v, a, s):
    """x0 = a x_t - s v (uses a^2 + s^2 = 1)."""
    return a * x_t - s * v


def eps_from_v(x_t, v, a, s):
    """eps = a v + s x_t (uses a^2 + s^2 = 1)."""
    return a * v + s * x_t


def eps_from_x0(x_t, x0, a, s):
    """eps = (x_t - a x0) / s."""
    return (x_t - a * x0) / s
