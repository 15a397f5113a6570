"""Samplers in the sigma formulation: one short function per update rule over a denoiser D(x; sigma).

Every sampler integrates the probability-flow ODE of Karras et al. 2022 (eq. 1 with sigma(t) = t and
the score of eq. 3), dx/dsigma = (x - D(x; sigma)) / sigma, or a stochastic version of it, along
a descending schedule ``sigmas`` [n + 1] (usually ending in 0), starting from x = x_T * sigmas[0].

============ =====================================================================================
x            the sample at noise level sigma: x = x0 + sigma * n
D(x; sigma)  the denoiser (``DiscreteDenoiser``): the model's x0 estimate, "denoised"
d            (x - D) / sigma: the ODE's derivative dx/dsigma (an eps estimate)
sigma_hat    sigma raised by "churn" noise (Karras et al., Algorithm 2, lines 4-6)
lambda, h    lambda = -log sigma (half the log-SNR); h = lambda_next - lambda = log(sigma / sigma_next)
sigma_down   the level an ancestral step integrates down to; sigma_up the std of the noise it adds
             back, sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM posterior in sigma form)
eta          0 = the deterministic solver, 1 = the ancestral/SDE solver's full noise
noise        ``noise(sigma, sigma_next)`` -> N(0, I) like x (``GaussianNoise``/``BrownianTreeNoise``)
============ =====================================================================================

In this form a first-order exponential step is a plain interpolation,
x_next = D + (sigma_next / sigma)(x - D), i.e. Euler = DDIM = DPM-Solver++(1); the higher-order
rules correct D with earlier or intermediate estimates. Each function returns the final x and calls
``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` once per step, as k-diffusion does.
"""
import math

from numpy.polynomial import Polynomial
from tqdm import trange

from .denoiser import set_step
from .noise import BrownianTreeNoise, GaussianNoise, draw_seed
from .unipc import sample_unipc_bh1, sample_unipc_bh2


# ----------------------------------------------------------------------------------------- helpers
def _floats(sigmas):
    return [float(s) for s in sigmas]


def _steps(denoiser, sig, progress, name):
    """The step indices of a run over ``sig``, each announced to ``denoiser`` before its evaluations:
    the second evaluation of a second-order step belongs to the step, not to the next one."""
    for i in trange(len(sig) - 1, desc=name, disable=not progress):
        set_step(denoiser, i)
        yield i


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 1 and 3)."""
    return (x - denoised) / sigma


def toward(x, denoised, sigma, sigma_to):
    """The exact step of the ODE with D held fixed: D + (sigma_to / sigma)(x - D)."""
    return denoised + (sigma_to / sigma) * (x - denoised)


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the DDPM posterior
    variance (Ho et al. 2020, eq. 7) written in sigma form (DDIM's eta of Song et al. 2021, eq. 16);
    deterministic integration to sigma_down followed by noise of std sigma_up lands on sigma_next.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise sigma to sigma_hat = (1 + gamma) sigma by adding
    noise, gamma = min(s_churn / n, sqrt(2) - 1) inside [s_tmin, s_tmax]. No noise is drawn when gamma = 0."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)
    return x, sigma_hat


def _brownian(x, sig, noise):
    """The SDE samplers' default noise: a Brownian tree on [0, sigma_max] seeded from the global
    generator, so ``torch.manual_seed`` fixes it and every step count sees the same path."""
    if noise is not None:
        return noise
    return BrownianTreeNoise(x, 0.0, max(sig), draw_seed())


# ------------------------------------------------------------------------------ Karras et al. 2022
def sample_euler(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler steps x <- x + d (sigma_next - sigma_hat) (Karras et al. 2022, Algorithm 2 with the
    second-order correction left out; deterministic at ``s_churn`` = 0)."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "Euler"):
        x, sigma_hat = _churn(x, sig[i], len(sig) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        _report(callback, x, i, sig[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sig[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0,
                           s_noise=1.0):
    """Euler step to sigma_down, then fresh noise of std sigma_up (``ancestral_step``): Euler's method
    on the Karras ODE with the ancestral noise of DDPM (Ho et al. 2020, Algorithm 2)."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "Euler ancestral"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        if sig[i + 1] > 0:
            x = x + noise(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn):
    x' = x + d dt, then x <- x + (d + d(x', sigma_next)) / 2 dt; an Euler step into sigma = 0."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "Heun"):
        x, sigma_hat = _churn(x, sig[i], len(sig) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        _report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sig[i + 1], denoiser(x_2, sig[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


# --------------------------------------------------------------------------------- DPM-Solver-2
def _dpm_2_step(denoiser, x, d, sigma, sigma_to):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) in sigma form: an Euler half step to the
    midpoint in lambda, sigma_mid = sqrt(sigma sigma_to), and the full step with the midpoint's slope."""
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 steps (``_dpm_2_step``), churn as Karras et al. Algorithm 2; Euler into sigma = 0."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "DPM2"):
        x, sigma_hat = _churn(x, sig[i], len(sig) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        _report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(denoiser, x, d, sigma_hat, sig[i + 1])
    return x


def sample_dpm_2_ancestral(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0,
                           s_noise=1.0):
    """DPM-Solver-2 step to sigma_down, then noise of std sigma_up (``ancestral_step``)."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "DPM2 ancestral"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        d = to_d(x, sig[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            x = _dpm_2_step(denoiser, x, d, sig[i], sigma_down)
            x = x + noise(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


# ------------------------------------------------------------------------------------------- LMS
def lms_coefficient(sig, i, j, order):
    """Weight of d_{i-j} in the Adams-Bashforth step from sig[i] to sig[i+1]: the integral over that
    step of the Lagrange basis polynomial of node sig[i-j] among sig[i], ..., sig[i-order+1]
    (variable step sizes, so the weights are integrated for every step; exact, by polynomial algebra)."""
    nodes = [sig[i - k] for k in range(order)]
    basis = Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sig[i + 1]) - antiderivative(sig[i]))


def sample_lms(denoiser, x, sigmas, *, callback=None, progress=True, order=4):
    """Linear multistep (Adams-Bashforth, up to ``order`` past derivatives) on the Karras ODE:
    x <- x + sum_j c_j d_{i-j}, c_j = ``lms_coefficient`` (Hairer, Norsett & Wanner, Solving ODEs I, III.1)."""
    sig = _floats(sigmas)
    derivatives = []  # newest last
    for i in _steps(denoiser, sig, progress, "LMS"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        derivatives = (derivatives + [to_d(x, sig[i], denoised)])[-order:]
        current = len(derivatives)
        x = x + sum(lms_coefficient(sig, i, j, current) * d for j, d in enumerate(reversed(derivatives)))
    return x


# ---------------------------------------------------------------------------------- DPM-Solver++
def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, progress=True):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): the exponential step with D extrapolated
    from the last two estimates, D_d = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i;
    first-order on the first step and into sigma = 0."""
    sig = _floats(sigmas)
    old_denoised, h_last = None, None
    for i in _steps(denoiser, sig, progress, "DPM++ 2M"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            target = denoised
            if old_denoised is not None:
                r = h_last / h
                target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = toward(x, target, sig[i], sig[i + 1])
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0,
                              s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) to sigma_down: a first-order step to
    the lambda midpoint sqrt(sigma sigma_down), then the full step with the midpoint's D; then noise of
    std sigma_up (``ancestral_step``)."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "DPM++ 2S ancestral"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sig[i] * sigma_down)
            x_2 = toward(x, denoised, sig[i], sigma_mid)
            x = toward(x, denoiser(x_2, sigma_mid), sig[i], sigma_down)
        if sig[i + 1] > 0:
            x = x + noise(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0, s_noise=1.0,
                     r=0.5):
    """Stochastic DPM-Solver++ (k-diffusion's "DPM++ SDE"): a DPM-Solver++(2S) step whose two stages
    are ancestral steps, to sigma_s = sigma^(1-r) sigma_next^r (lambda + r h) and to sigma_next,
    with D_d = (1 - 1/(2r)) D + 1/(2r) D(x_s); the noise comes from one Brownian path (``_brownian``).
    Euler into sigma = 0."""
    sig = _floats(sigmas)
    noise = _brownian(x, sig, noise)
    fac = 1 / (2 * r)
    for i in _steps(denoiser, sig, progress, "DPM++ SDE"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        sigma_s = sig[i] ** (1 - r) * sig[i + 1] ** r
        sigma_down, sigma_up = ancestral_step(sig[i], sigma_s, eta)
        x_2 = toward(x, denoised, sig[i], sigma_down) + noise(sig[i], sigma_s) * s_noise * sigma_up
        denoised_d = (1 - fac) * denoised + fac * denoiser(x_2, sigma_s)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = toward(x, denoised_d, sig[i], sigma_down) + noise(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, the SDE variant of Algorithm 2):

        x <- (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D + correction
             + sigma_next sqrt(1 - e^(-2 eta h)) z

    with the second-order correction from D_{i-1} by the "midpoint" or "heun" rule, z from one
    Brownian path (``_brownian``); the step into sigma = 0 returns D."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = _floats(sigmas)
    noise = _brownian(x, sig, noise)
    old_denoised, h_last = None, None
    for i in _steps(denoiser, sig, progress, "DPM++ 2M SDE"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)  # 1 - e^(-(1 + eta) h)
            x = sig[i + 1] / sig[i] * math.exp(-eta_h) * x + decay * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    x = x + 0.5 * decay / r * (denoised - old_denoised)
                else:
                    x = x + (decay / (-h - eta_h) + 1) / r * (denoised - old_denoised)
            if eta:
                x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, callback=None, progress=True, noise=None, eta=1.0, s_noise=1.0):
    """SDE-DPM-Solver++(3M): the exponential step over h_eta = (1 + eta) h,
    x <- e^(-h_eta) x + (1 - e^(-h_eta)) D + phi_2 D1 - phi_3 D2 + sigma_next sqrt(1 - e^(-2 eta h)) z,
    with first and second divided differences D1, D2 of the last three D (lower order at the start),
    phi_2 = (e^(-h_eta) - 1) / h_eta + 1, phi_3 = phi_2 / h_eta - 1/2 (Lu et al. 2022b's multistep
    construction carried to third order, as in k-diffusion); the step into sigma = 0 returns D."""
    sig = _floats(sigmas)
    noise = _brownian(x, sig, noise)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in _steps(denoiser, sig, progress, "DPM++ 3M SDE"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


# ------------------------------------------------------------------------------------ DDPM, LCM
def sample_ddpm(denoiser, x, sigmas, *, callback=None, progress=True, noise=None):
    """Ancestral DDPM (Ho et al. 2020, Algorithm 2) between the schedule's levels: with
    alpha_bar = 1 / (1 + sigma^2) and x_t = sqrt(alpha_bar) x, draw x_{t-1} from the posterior
    q(x_{t-1} | x_t, x0 = D) of eq. 6-7 (mean mu~, variance beta~), then scale back to sigma form."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "DDPM"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        ab, ab_next = 1 / (1 + sig[i] ** 2), 1 / (1 + sig[i + 1] ** 2)
        alpha = ab / ab_next
        beta = 1 - alpha
        x_t = math.sqrt(ab) * x
        mean = (math.sqrt(ab_next) * beta / (1 - ab)) * denoised + (math.sqrt(alpha) * (1 - ab_next) / (1 - ab)) * x_t
        if sig[i + 1] > 0:
            mean = mean + math.sqrt((1 - ab_next) / (1 - ab) * beta) * noise(sig[i], sig[i + 1])
        x = mean / math.sqrt(ab_next)
    return x


def sample_lcm(denoiser, x, sigmas, *, callback=None, progress=True, noise=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023's LCM): jump to
    the estimate D, then re-noise it to the next level, x <- D + sigma_next z."""
    sig = _floats(sigmas)
    noise = GaussianNoise(x) if noise is None else noise
    for i in _steps(denoiser, sig, progress, "LCM"):
        denoised = denoiser(x, sig[i])
        _report(callback, x, i, sig[i], sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + sig[i + 1] * noise(sig[i], sig[i + 1])
    return x


# ---------------------------------------------------------------------------------------- registry
K_SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc_bh1": sample_unipc_bh1,
    "unipc_bh2": sample_unipc_bh2,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
}
# Samplers that draw noise while sampling (so their result depends on the seed beyond x_T) ...
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                 "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm"})
# ... and those among them whose noise is one Brownian path (``BrownianTreeNoise``) rather than
# fresh Gaussian noise per step.
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"})
# Samplers that evaluate the model twice per step (once on the step into sigma = 0): a step costs
# about twice as much as with the others.
TWO_EVALUATIONS_PER_STEP = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"})
