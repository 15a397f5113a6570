"""Noise schedules, DDIM step selection and small network building blocks.

The schedule functions return float64 numpy arrays, as the official code does; models cast the
derived buffers to float32 only at the end, so the checkpoint buffers agree bit-for-bit.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ldm.errors import UserError


# ----------------------------------------------------------------------------- schedules
def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Beta_t for t = 0 .. n_timestep-1 as a float64 numpy array.

    "linear" is linear in sqrt(beta) (the LDM/SD schedule), "cosine" is Nichol & Dhariwal (2021)
    eq. 17 with offset ``cosine_s``, "squaredcos_cap_v2" is the same curve through
    ``betas_for_alpha_bar``; "sqrt_linear" / "sqrt" are the remaining official variants.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = np.clip((1 - alpha_bar[1:] / alpha_bar[:-1]).numpy(), a_min=0, a_max=0.999)
        return betas
    elif schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise UserError(f"unknown beta schedule '{schedule}' (use linear, cosine, squaredcos_cap_v2, "
                        "sqrt_linear or sqrt)")
    return betas.numpy()


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas capped at ``max_beta``."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


# Timestep spacings of diffusers' schedulers (``timestep_spacing``); "leading" is the official one.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# the official names: "uniform" is "leading", "quad" its quadratic variant
DDIM_DISCRETIZATIONS = ("uniform", "quad") + TIMESTEP_SPACINGS


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """The DDPM timesteps a DDIM run visits, ascending.

    ``ddim_discr_method`` is an official discretisation or one of diffusers' timestep spacings
    (Lin et al. 2023, table 2), for S steps over T training timesteps:

    ========== ========================================= ==================================
    uniform    arange(0, T, T // S) + 1                   official; the same as "leading"
    leading    arange(0, S) * (T // S) + 1                diffusers with steps_offset=1 (SD)
    trailing   round(T - arange(0, S) * T / S) - 1       always ends at T - 1
    linspace   round(linspace(0, T - 1, S))              from 0 to T - 1
    quad       int(linspace(0, sqrt(0.8 T), S) ** 2) + 1 official
    ========== ========================================= ==================================

    The official discretisations add 1 to every step so that the least noisy one is 1 (the
    final alpha_prev is alphas_cumprod[0] whatever the spacing); checkpoints were tuned with
    this, so "uniform"/"leading" keep the official numbers exactly. Only
    "trailing" and "linspace" (from 2 steps) reach the last timestep T - 1, which a zero-terminal-SNR model
    needs to start from pure noise (Lin et al. 2023, sec. 3.3).
    """
    if num_ddim_timesteps > num_ddpm_timesteps or num_ddim_timesteps < 1:
        raise UserError(f"steps must be between 1 and {num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if ddim_discr_method in ("uniform", "leading"):
        stride = num_ddpm_timesteps // num_ddim_timesteps
        # When T is not a multiple of the step count the stride gives one step too many (the
        # official code then indexes past the schedule); keep exactly the requested number.
        steps_out = np.arange(0, num_ddpm_timesteps, stride)[:num_ddim_timesteps] + 1
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
        steps_out = steps + 1
    elif ddim_discr_method == "trailing":
        # diffusers writes arange(T, 0, -T / S), whose length can come out as S + 1 in floating
        # point; counting the S steps explicitly gives the same values
        ratio = num_ddpm_timesteps / num_ddim_timesteps
        steps_out = np.round(num_ddpm_timesteps - np.arange(num_ddim_timesteps) * ratio).astype(np.int64)[::-1] - 1
    elif ddim_discr_method == "linspace":
        steps_out = np.linspace(0, num_ddpm_timesteps - 1, num_ddim_timesteps).round().astype(np.int64)
    else:
        raise UserError(f"unknown timestep spacing '{ddim_discr_method}' (use one of "
                        f"{', '.join(DDIM_DISCRETIZATIONS)})")
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    """sigma_t, alpha_t and alpha_{t-1} of the DDIM update (Song et al. 2021, eq. 16).

    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)); eta = 0 is deterministic
    DDIM, eta = 1 matches the DDPM posterior variance.
    """
    alphacums = torch.as_tensor(alphacums)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist())
    a = alphas.double().numpy()
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - a) * (1 - a / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {a}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule "
              f"for ddim sampler {sigmas}")
    return torch.from_numpy(sigmas), alphas, alphas_prev


def extract_into_tensor(a, t, x_shape):
    """a[t] reshaped to [B, 1, 1, ...] so it broadcasts against a tensor of ``x_shape``."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape, device, repeat=False):
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


# ----------------------------------------------------------------------------- embeddings
def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps: [N] -> [N, dim]."""
    if repeat_only:
        return timesteps[:, None].float().repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# ----------------------------------------------------------------------------- layers
def checkpoint(func, inputs, params, flag):
    """Gradient checkpointing of ``func(*inputs)`` when ``flag`` and gradients are being taken.

    ``params`` is accepted for the official signature; non-reentrant checkpointing finds them itself.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def zero_module(module):
    # through torch.nn.init, so that a build whose weights are loaded next skips it (ldm.skip_init)
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def scale_module(module, scale):
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype (fp16/bf16 statistics drift)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


class SiLU(nn.Module):
    def forward(self, x):
        return F.silu(x)


def _of_dims(dims, layers):
    """The 1D, 2D or 3D variant of a layer."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims - 1]


def conv_nd(dims, *args, **kwargs):
    return _of_dims(dims, (nn.Conv1d, nn.Conv2d, nn.Conv3d))(*args, **kwargs)


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    return _of_dims(dims, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))(*args, **kwargs)
