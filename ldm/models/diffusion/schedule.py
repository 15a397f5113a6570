"""The DDPM forward-process schedule and the x0 / eps / v algebra, as pure functions.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):

    alpha_bar_t   cumulative product of (1 - beta)        x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    v             sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
    a, s          sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) broadcast to the sample's shape

The buffers are computed in float64 and stored as float32, exactly as the official code stores
them in every checkpoint.
"""
import numpy as np
import torch

# Persistent buffers, in the official registration order (they are checkpoint keys).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_buffers(betas, v_posterior=0.0):
    """All persistent schedule buffers for ``betas`` (float64 numpy) as float32 tensors."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Posterior q(x_{t-1} | x_t, x0); v_posterior interpolates its variance towards beta_t.
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          + v_posterior * betas)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, so the log is clipped
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    # device="cpu" keeps the schedule real even when the model is built under a meta-device context
    return {k: torch.tensor(values[k], dtype=torch.float32, device="cpu") for k in SCHEDULE_BUFFERS}


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
