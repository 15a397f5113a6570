"""The sigma-formulation samplers (``k_sampling``, ``KDiffusionSampler``): every sampler x schedule on tiny
eps and v models, exactness checks against closed forms and DDIM, seeding, img2img and inpainting."""
import itertools
import math

import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.k_sampler import KDiffusionSampler
from ldm.models.diffusion.k_sampling import (
    BROWNIAN_SAMPLERS,
    K_SAMPLERS,
    SIGMA_SCHEDULES,
    STOCHASTIC_SAMPLERS,
    BrownianTreeNoise,
    DiscreteDenoiser,
    GaussianNoise,
    sigmas_from_list,
)
from ldm.models.diffusion.k_sampling.schedules import AYS_SD1_SIGMAS, beta_quantile

SHAPE = [4, 8, 8]
DETERMINISTIC = sorted(set(K_SAMPLERS) - STOCHASTIC_SAMPLERS)


def contexts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)


def latent(seed):
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(seed))


def run(model, sampler="euler", schedule="normal", steps=3, x_T=None, scale=3.0, sigmas=None, **kw):
    ctx, uctx = contexts()
    k = KDiffusionSampler(model, sampler, schedule, sigmas=sigmas, device="cpu")
    samples, intermediates = k.sample(S=steps, batch_size=2, shape=SHAPE, conditioning=ctx, verbose=False,
                                      x_T=latent(4) if x_T is None else x_T, unconditional_guidance_scale=scale,
                                      unconditional_conditioning=uctx, progress=False, **kw)
    assert intermediates is None
    return samples


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("schedule", list(SIGMA_SCHEDULES))
@pytest.mark.parametrize("sampler", list(K_SAMPLERS))
def test_every_sampler_and_schedule_runs_on_eps_and_v_models(sampler, schedule, parameterization, eps_model,
                                                             v_model):
    """One image without guidance, to keep the 210 runs cheap; guidance is in the tests below."""
    model = eps_model if parameterization == "eps" else v_model
    k = KDiffusionSampler(model, sampler, schedule, device="cpu")
    steps = []
    torch.manual_seed(0)
    with torch.no_grad():
        out, _ = k.sample(S=3, batch_size=1, shape=SHAPE, conditioning=contexts()[0][:1], x_T=latent(4)[:1],
                          callback=steps.append, progress=False)
    assert out.shape == (1, *SHAPE) and torch.isfinite(out).all()
    assert steps == [0, 1, 2]
    # the sample is the model's work, not the scaled start noise
    assert (out - latent(4)[:1] * 14.6146).abs().mean() > 0.1


def test_a_user_list_of_sigmas_replaces_the_schedule_and_the_step_count(eps_model):
    steps = []
    with torch.no_grad():
        out = run(eps_model, "dpmpp_2m", steps=20, sigmas="14.6, 4.0 1.0 0.2", callback=steps.append)
        # the same run with the list given as the equivalent schedule through the sampler function
        ctx, uctx = contexts()
        denoiser = KDiffusionSampler(eps_model, "dpmpp_2m").denoiser(ctx, uctx, 3.0)
        sigmas = torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0])
        ref = K_SAMPLERS["dpmpp_2m"](denoiser, latent(4) * 14.6, sigmas, progress=False)
    assert steps == [0, 1, 2, 3]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class VFromEps:
    """Presents an eps-model as a v-model: v = (eps - s x_t) / a at the fractional timestep's
    (a, s) = (1, sigma) / sqrt(1 + sigma^2), sigma interpolated in log sigma over the DDPM sigmas
    (computed here with numpy, independently of ``DiscreteDenoiser``)."""

    def __init__(self, eps_model):
        self.inner = eps_model
        self.parameterization = "v"
        acp = eps_model.alphas_cumprod.double().numpy()
        self.log_sigmas = np.log(np.sqrt((1 - acp) / acp))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_model(self, x, t, cond):
        eps = self.inner.apply_model(x, t, cond)
        sigma = np.exp(np.interp(t.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas))
        sigma = torch.from_numpy(sigma).reshape(-1, 1, 1, 1)
        a, s = (1 / (1 + sigma ** 2).sqrt()).to(x), (sigma / (1 + sigma ** 2).sqrt()).to(x)
        return (eps - s * x) / a


@pytest.mark.parametrize("sampler", list(K_SAMPLERS))
def test_v_model_gives_the_same_samples_as_the_equivalent_eps_model(sampler, eps_model):
    with torch.no_grad():
        torch.manual_seed(0)
        from_eps = run(eps_model, sampler, "karras", steps=4)
        torch.manual_seed(0)
        from_v = run(VFromEps(eps_model), sampler, "karras", steps=4)
    torch.testing.assert_close(from_v, from_eps, rtol=1e-5, atol=1e-4)


def test_the_unet_receives_fractional_timesteps(eps_model):
    """Through GuidedModel (with guidance: the batch is doubled) down to the U-Net's forward."""
    seen = []
    unet = eps_model.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[1]), with_kwargs=True)
    try:
        k = KDiffusionSampler(eps_model)
        denoiser = k.denoiser(*contexts(), unconditional_guidance_scale=3.0)
        sigma = math.sqrt(float(denoiser.model_sigmas[500] * denoiser.model_sigmas[501]))  # halfway in log sigma
        with torch.no_grad():
            denoiser(latent(1), sigma)
    finally:
        hook.remove()
    assert seen[0].dtype == torch.float32 and seen[0].shape == (4,)
    torch.testing.assert_close(seen[0], torch.full((4,), 500.5), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- exactness checks
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_euler_on_the_ddim_timesteps_is_ddim(parameterization, eps_model, v_model):
    """DDIM (eta 0) is Euler's method on the sigma ODE (Karras et al. 2022, Section 3): on the sigmas of
    DDIM's timesteps, from the same start (x = x_T sqrt(1 + sigma^2)), the samples agree."""
    model = eps_model if parameterization == "eps" else v_model
    ctx, uctx = contexts()
    with torch.no_grad():
        ddim = DDIMSampler(model, device="cpu")
        ref, _ = ddim.sample(S=8, batch_size=2, shape=SHAPE, conditioning=ctx, unconditional_conditioning=uctx,
                             unconditional_guidance_scale=3.0, x_T=latent(4), progress=False, verbose=False)
        denoiser = KDiffusionSampler(model, "euler").denoiser(ctx, uctx, 3.0)
        # DDIM's last step goes to alpha_bar[0], i.e. to sigma(t=0), not to 0
        timesteps = list(reversed(ddim.ddim_timesteps.tolist())) + [0]
        sigmas = denoiser.model_sigmas[timesteps]
        x = latent(4) * float((1 + sigmas[0] ** 2).sqrt())
        out = K_SAMPLERS["euler"](denoiser, x, sigmas.float(), progress=False) / float((1 + sigmas[-1] ** 2).sqrt())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_euler_with_the_normal_schedule_approaches_ddim_with_many_steps(eps_model):
    ctx, uctx = contexts()
    model = eps_model
    ddim = DDIMSampler(model, device="cpu")

    def ddim_sample(steps):
        out, _ = ddim.sample(S=steps, batch_size=2, shape=SHAPE, conditioning=ctx, unconditional_conditioning=uctx,
                             unconditional_guidance_scale=3.0, x_T=latent(4), progress=False, verbose=False)
        return out

    with torch.no_grad():
        # step counts that divide 1000, so that DDIM takes exactly that many steps
        err_few = (run(model, "euler", steps=8) - ddim_sample(8)).abs().mean()
        err_many = (run(model, "euler", steps=40) - ddim_sample(40)).abs().mean()
        other_seed = (run(model, "euler", steps=8, x_T=latent(5)) - run(model, "euler", steps=8)).abs().mean()
    assert err_many < err_few / 3
    assert err_many < 0.1 * other_seed


def test_ddpm_is_euler_ancestral(eps_model):
    """The DDPM posterior step written in sigma form is exactly the ancestral Euler step (eta 1)."""
    with torch.no_grad():
        torch.manual_seed(0)
        ddpm = run(eps_model, "ddpm", steps=5)
        torch.manual_seed(0)
        euler_a = run(eps_model, "euler_ancestral", steps=5)
    torch.testing.assert_close(ddpm, euler_a, rtol=1e-5, atol=1e-4)


# Data x0 ~ N(0, SD^2 I) has the exact denoiser D(x; sigma) = x SD^2 / (sigma^2 + SD^2) and the ODE solution
# x(sigma) = x(sigma_max) sqrt(sigma^2 + SD^2) / sqrt(sigma_max^2 + SD^2): a closed form to check the update rules.
SD = 0.5


def gaussian_denoiser(x, sigma):
    return x * SD ** 2 / (float(sigma) ** 2 + SD ** 2)


def karras_sigmas(n, sigma_min=0.05, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


# sampler -> (options, order of convergence): the error must shrink by at least 0.8 * 2^order when the
# steps double. UniPC's default last step is first order (lower_order_final), which caps it at 2;
# without it UniPC-3 with its corrector is of order 4.
CONVERGENCE = {"euler": ({}, 1), "heun": ({}, 2), "dpm_2": ({}, 2), "lms": ({}, 3), "dpmpp_2m": ({}, 2),
               "unipc_bh1": ({}, 2), "unipc_bh2": ({}, 2)}
CONVERGENCE_EXTRA = {"unipc_bh1 without lower_order_final": ("unipc_bh1", {"lower_order_final": False}, 4),
                     "unipc_bh2 without lower_order_final": ("unipc_bh2", {"lower_order_final": False}, 4)}
CONVERGENCE_CASES = {**{name: (name, *case) for name, case in CONVERGENCE.items()}, **CONVERGENCE_EXTRA}


@pytest.mark.parametrize("case", list(CONVERGENCE_CASES))
def test_deterministic_samplers_converge_to_the_exact_ode_solution(case):
    sampler, options, order = CONVERGENCE_CASES[case]
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_T * 14.6 * math.sqrt(0.05 ** 2 + SD ** 2) / math.sqrt(14.6 ** 2 + SD ** 2)
    errors = []
    for n in (40, 80, 160):
        sigmas = karras_sigmas(n + 1)  # no final 0: compare with x(sigma_min)
        x = K_SAMPLERS[sampler](gaussian_denoiser, x_T * 14.6, sigmas, progress=False, **options)
        errors.append(float((x - exact).abs().max()))
    assert errors[-1] < 0.02
    assert errors[0] / errors[1] > 0.8 * 2 ** order and errors[1] / errors[2] > 0.8 * 2 ** order, errors


def test_every_deterministic_sampler_has_a_convergence_check():
    assert sorted(CONVERGENCE) == DETERMINISTIC


# stochastic sampler -> steps at which the output's std is within 3% of the data's
DISTRIBUTION_STEPS = {"euler_ancestral": 400, "ddpm": 400, "dpm_2_ancestral": 100, "dpmpp_2s_ancestral": 100,
                      "dpmpp_sde": 100, "dpmpp_2m_sde": 100, "dpmpp_3m_sde": 100}


@pytest.mark.parametrize("sampler", sorted(DISTRIBUTION_STEPS))
def test_stochastic_samplers_sample_the_data_distribution(sampler):
    """From x ~ N(0, sigma_max^2 + SD^2) the SDE/ancestral samplers must end with std SD: too much or too
    little injected noise (a wrong sigma_up or noise scale) shows up as a wrong spread."""
    x_T = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    sigmas = torch.cat([karras_sigmas(DISTRIBUTION_STEPS[sampler], sigma_min=0.03), torch.zeros(1, dtype=torch.float64)])
    x = K_SAMPLERS[sampler](gaussian_denoiser, x_T * math.sqrt(14.6 ** 2 + SD ** 2), sigmas, progress=False)
    assert abs(float(x.std()) / SD - 1) < 0.03
    assert abs(float(x.mean())) < 0.02


def test_churn_makes_heun_stochastic_and_keeps_the_data_distribution():
    """Karras et al. 2022, Algorithm 2: churn re-noises to sigma_hat before each Heun step."""
    x_T = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = x_T * math.sqrt(14.6 ** 2 + SD ** 2)
    sigmas = torch.cat([karras_sigmas(100, sigma_min=0.03), torch.zeros(1, dtype=torch.float64)])
    ode = K_SAMPLERS["heun"](gaussian_denoiser, x_T, sigmas, progress=False)
    torch.manual_seed(0)
    churned = K_SAMPLERS["heun"](gaussian_denoiser, x_T, sigmas, progress=False, s_churn=40.0)
    assert abs(float(churned.std()) / SD - 1) < 0.03
    assert (churned - ode).abs().mean() > 0.05


def test_lcm_jumps_to_the_estimate_and_renoises_to_the_next_level():
    target = torch.full((20000,), 0.25, dtype=torch.float64)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    states = []
    torch.manual_seed(0)
    out = K_SAMPLERS["lcm"](lambda x, sigma: target, torch.zeros(20000, dtype=torch.float64), sigmas,
                            progress=False, callback=lambda info: states.append(info["x"]))
    torch.testing.assert_close(out, target, rtol=0, atol=0)
    for state, sigma in zip(states[1:], (3.0, 1.0)):
        assert abs(float((state - target).std()) / sigma - 1) < 0.03


# ------------------------------------------------------------------------------------ seeding
@pytest.mark.parametrize("sampler", sorted(STOCHASTIC_SAMPLERS))
def test_stochastic_samplers_give_one_image_per_seed(sampler, eps_model):
    with torch.no_grad():
        torch.manual_seed(0)
        a = run(eps_model, sampler, "karras", steps=4)
        torch.manual_seed(0)
        b = run(eps_model, sampler, "karras", steps=4)
        torch.manual_seed(1)
        c = run(eps_model, sampler, "karras", steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_ignore_the_global_rng(sampler, eps_model):
    with torch.no_grad():
        torch.manual_seed(0)
        a = run(eps_model, sampler, "karras", steps=4)
        torch.manual_seed(99)
        b = run(eps_model, sampler, "karras", steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_start_noise_is_drawn_from_the_global_rng_and_scaled_by_the_first_sigma(eps_model):
    ctx, _ = contexts()
    k = KDiffusionSampler(eps_model, "euler", "karras", device="cpu")
    first = []
    with torch.no_grad():
        torch.manual_seed(11)
        a, _ = k.sample(S=3, batch_size=2, shape=SHAPE, conditioning=ctx, progress=False,
                        callback=lambda i: None, img_callback=lambda x0, i: first.append(x0))
        torch.manual_seed(11)
        x_T = torch.randn(2, *SHAPE)
        b, _ = k.sample(S=3, batch_size=2, shape=SHAPE, conditioning=ctx, x_T=x_T, progress=False)
        sigma_max = k.denoiser(ctx).sigma_max
        expected_first = k.denoiser(ctx)(x_T * sigma_max, sigma_max)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(first) == 3
    torch.testing.assert_close(first[0], expected_first)


def test_brownian_tree_is_one_path_per_seed():
    x = torch.zeros(4, 16, 16)
    tree = BrownianTreeNoise(x, 0.0, 14.6, seed=123)
    again = BrownianTreeNoise(x, 0.0, 14.6, seed=123)
    other = BrownianTreeNoise(x, 0.0, 14.6, seed=124)
    torch.testing.assert_close(tree(7.3, 2.1), again(7.3, 2.1), rtol=0, atol=0)
    assert (tree(7.3, 2.1) - other(7.3, 2.1)).abs().max() > 0.5
    # whatever the steps, the increments add up: one coarse step = the sum of the fine steps it covers
    coarse = tree(7.3, 2.1) * math.sqrt(7.3 - 2.1)
    fine = tree(7.3, 5.0) * math.sqrt(2.3) + tree(5.0, 3.333) * math.sqrt(5.0 - 3.333) \
        + tree(3.333, 2.1) * math.sqrt(3.333 - 2.1)
    torch.testing.assert_close(fine, coarse, rtol=1e-5, atol=1e-5)
    assert tree(7.3, 2.1).shape == x.shape and tree(7.3, 2.1).dtype == x.dtype
    # W(t) does not depend on what was asked before (the tree resumes from its last path)
    for t in (14.6, 0.03, 0.0301, 7.3, 1.0, 3.65, 0.5, 0.0):
        torch.testing.assert_close(tree.w(t), BrownianTreeNoise(x, 0.0, 14.6, seed=123).w(t), rtol=0, atol=0)


def test_brownian_tree_increments_are_independent_standard_normals():
    x = torch.zeros(40000)
    tree = BrownianTreeNoise(x, 0.0, 14.6, seed=7)
    # non-dyadic points, so the values come from bridges at many depths, and one tiny step
    points = [14.6, 9.17, 3.3, 1.234, 0.301, 0.05, 0.0499]
    increments = [tree(a, b) for a, b in itertools.pairwise(points)]
    for z in increments:
        assert abs(float(z.std()) - 1) < 0.03 and abs(float(z.mean())) < 0.03
    for z1, z2 in itertools.pairwise(increments):
        assert abs(float((z1 * z2).mean())) < 0.03
    # overlapping steps share their common part: corr = overlap / sqrt(len1 * len2)
    corr = float((tree(9.17, 1.234) * tree(3.3, 0.301)).mean())
    assert abs(corr - (3.3 - 1.234) / math.sqrt((9.17 - 1.234) * (3.3 - 0.301))) < 0.03


def test_the_brownian_samplers_are_the_ones_that_build_a_brownian_tree(monkeypatch):
    from ldm.models.diffusion.k_sampling import samplers as sampler_module
    built = []

    class RecordingTree(BrownianTreeNoise):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(sampler_module, "BrownianTreeNoise", RecordingTree)
    uses_tree = set()
    for name, sample in K_SAMPLERS.items():
        built.clear()
        sample(gaussian_denoiser, torch.randn(64, dtype=torch.float64) * 14.6, karras_sigmas(4), progress=False)
        if built:
            uses_tree.add(name)
            assert len(built) == 1 and built[0].t1 == pytest.approx(14.6)
    assert uses_tree == BROWNIAN_SAMPLERS <= STOCHASTIC_SAMPLERS


def test_sde_sampler_with_the_brownian_tree_converges_across_step_counts():
    """One seed is one Brownian path, so more steps refine the same sample; with fresh Gaussian noise
    per step every step count is a different sample."""
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6

    def sample(steps, noise_kind):
        sigmas = torch.cat([karras_sigmas(steps, sigma_min=0.03), torch.zeros(1, dtype=torch.float64)])
        noise = BrownianTreeNoise(x_T, 0.0, 14.6, seed=5) if noise_kind == "tree" else GaussianNoise(x_T)
        return K_SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser, x_T, sigmas, noise=noise, progress=False)

    torch.manual_seed(0)
    tree_gap = float((sample(100, "tree") - sample(200, "tree")).abs().mean())
    fresh_gap = float((sample(100, "fresh") - sample(200, "fresh")).abs().mean())
    assert tree_gap < 0.1 * fresh_gap


# ------------------------------------------------------------------------------------ schedules
class NoModel:
    """Stands in for a ``GuidedModel`` where only the denoiser's sigmas are used."""
    parameterization = "eps"


@pytest.fixture(scope="module")
def sd_denoiser():
    """A denoiser on the SD noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteDenoiser(NoModel(), torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("n", [1, 2, 7, 10, 25])
@pytest.mark.parametrize("schedule", list(SIGMA_SCHEDULES))
def test_schedules_descend_to_zero_in_n_steps(schedule, n, sd_denoiser):
    sigmas = SIGMA_SCHEDULES[schedule](n, sd_denoiser, "cpu")
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all()
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert float(sigmas[0]) == pytest.approx(sd_denoiser.sigma_max, rel=1e-4)
    assert float(sigmas[0]) == pytest.approx(14.6146, rel=1e-4)


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential", "polyexponential"])
def test_range_schedules_end_at_the_model_sigma_min(schedule, sd_denoiser):
    sigmas = SIGMA_SCHEDULES[schedule](12, sd_denoiser, "cpu")
    assert float(sigmas[-2]) == pytest.approx(sd_denoiser.sigma_min, rel=1e-5)
    assert sd_denoiser.sigma_min == pytest.approx(0.0291675, rel=1e-4)


def test_normal_schedule_is_uniform_in_t(sd_denoiser):
    sigmas = SIGMA_SCHEDULES["normal"](7, sd_denoiser, "cpu")
    torch.testing.assert_close(sd_denoiser.sigma_to_t(sigmas[:-1].double()),
                               torch.linspace(999, 0, 7, dtype=torch.float64), rtol=0, atol=1e-3)


def test_karras_schedule_is_linear_in_sigma_to_the_one_over_rho(sd_denoiser):
    sigmas = SIGMA_SCHEDULES["karras"](9, sd_denoiser, "cpu")[:-1].double()
    steps = (sigmas ** (1 / 7)).diff()
    torch.testing.assert_close(steps, steps[:1].expand(8), rtol=1e-4, atol=0)
    exponential = SIGMA_SCHEDULES["exponential"](9, sd_denoiser, "cpu")[:-1].double()
    torch.testing.assert_close(exponential.log().diff(), exponential.log().diff()[:1].expand(8), rtol=1e-4, atol=0)


def test_simple_schedule_takes_every_t_over_n_th_model_sigma(sd_denoiser):
    sigmas = SIGMA_SCHEDULES["simple"](4, sd_denoiser, "cpu")
    expected = sd_denoiser.model_sigmas[[999, 749, 499, 249]]
    torch.testing.assert_close(sigmas[:-1].double(), expected, rtol=1e-6, atol=0)


def test_beta_schedule_timesteps(sd_denoiser):
    # Beta(0.6, 0.6) quantiles of 1, 0.9, ..., 0.1 times 999, rounded: computed with scipy.stats.beta.ppf
    expected_t = [999, 959, 876, 765, 637, 500, 362, 234, 123, 40]
    sigmas = SIGMA_SCHEDULES["beta"](10, sd_denoiser, "cpu")
    torch.testing.assert_close(sigmas[:-1].double(), sd_denoiser.model_sigmas[expected_t], rtol=1e-6, atol=0)
    assert beta_quantile(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)
    assert beta_quantile(0.25, 1.0, 1.0) == pytest.approx(0.25, abs=1e-12)  # Beta(1, 1) is uniform
    assert beta_quantile(0.36, 2.0, 1.0) == pytest.approx(0.6, abs=1e-12)  # CDF x^2


def test_beta_schedule_drops_repeated_timesteps(sd_denoiser):
    sigmas = SIGMA_SCHEDULES["beta"](200, sd_denoiser, "cpu")
    assert len(sigmas) < 201 and (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0


def test_align_your_steps_uses_the_published_list_and_interpolates_log_linearly(sd_denoiser):
    ten = SIGMA_SCHEDULES["align_your_steps"](10, sd_denoiser, "cpu")
    published = torch.tensor(AYS_SD1_SIGMAS[:-1] + (0.0,), dtype=torch.float32)
    torch.testing.assert_close(ten, published, rtol=0, atol=0)
    assert AYS_SD1_SIGMAS[:3] == (14.6146412293, 6.4745760956, 3.8636745985)
    twenty = SIGMA_SCHEDULES["align_your_steps"](20, sd_denoiser, "cpu").double()
    listed = torch.tensor(AYS_SD1_SIGMAS, dtype=torch.float64)
    # every other level of the 20-step schedule is a published level, the ones between their geometric means
    torch.testing.assert_close(twenty[0:20:2], listed[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(twenty[1:20:2], (listed[:10] * listed[1:]).sqrt(), rtol=1e-6, atol=0)
    assert twenty[20] == 0


def test_sigma_and_t_round_trip(sd_denoiser):
    t = torch.tensor([0.0, 0.25, 1.5, 17.3, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sd_denoiser.sigma_to_t(sd_denoiser.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    integers = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(sd_denoiser.t_to_sigma(integers.double()), sd_denoiser.model_sigmas[integers])
    torch.testing.assert_close(sd_denoiser.sigma_to_t(sd_denoiser.model_sigmas[integers]), integers.double(),
                               rtol=0, atol=1e-9)
    # outside the model's range the timestep is clamped
    assert float(sd_denoiser.sigma_to_t(100.0)) == 999.0 and float(sd_denoiser.sigma_to_t(1e-4)) == 0.0


def test_sigmas_from_a_user_list():
    torch.testing.assert_close(sigmas_from_list("14.6, 4 1.5,0.3"), torch.tensor([14.6, 4.0, 1.5, 0.3, 0.0]))
    torch.testing.assert_close(sigmas_from_list([3, 1.0, 0]), torch.tensor([3.0, 1.0, 0.0]))
    torch.testing.assert_close(sigmas_from_list(" 2.5 "), torch.tensor([2.5, 0.0]))


@pytest.mark.parametrize("text, message", [
    ("", "at least one"), ("0", "at least one"), ("5, x, 1", "'x' is not a number"), ("5, -1", "positive"),
    ("5, 0, 1", "positive"), ("1, 2", "strictly descending"), ("3, 3, 1", "strictly descending"),
    ("5, nan", "finite"), ("inf, 1", "finite")])
def test_sigmas_from_a_user_list_refuses_bad_lists(text, message):
    with pytest.raises(UserError, match=message):
        sigmas_from_list(text)


# ------------------------------------------------------------------------------- img2img, inpainting
def test_img2img_strength_zero_returns_the_input_and_one_is_a_full_sample(eps_model):
    ctx, uctx = contexts()
    k = KDiffusionSampler(eps_model, "dpmpp_2m", "karras", device="cpu")
    init, noise = latent(7), latent(8)
    with torch.no_grad():
        assert k.sample_img2img(6, init, 0.0, ctx, 3.0, uctx, noise=noise, progress=False) is init
        full = k.sample_img2img(6, init, 1.0, ctx, 3.0, uctx, noise=noise, progress=False)
        sigma_max = float(k.sigmas_for(6, k.denoiser(ctx))[0])
        reference, _ = k.sample(S=6, batch_size=2, shape=SHAPE, conditioning=ctx, unconditional_guidance_scale=3.0,
                                unconditional_conditioning=uctx, x_T=noise + init / sigma_max, progress=False)
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-4)


def test_img2img_runs_the_last_strength_times_steps_of_the_schedule(eps_model):
    ctx, uctx = contexts()
    k = KDiffusionSampler(eps_model, "euler", "karras", device="cpu")
    init, noise = latent(7), latent(8)
    denoiser = k.denoiser(ctx, uctx, 3.0)
    schedule = k.sigmas_for(10, denoiser)
    sigmas = k.img2img_sigmas(10, 0.35, denoiser)
    torch.testing.assert_close(sigmas, schedule[-4:], rtol=0, atol=0)  # int(0.35 * 10) = 3 steps
    steps = []
    with torch.no_grad():
        out = k.sample_img2img(10, init, 0.35, ctx, 3.0, uctx, noise=noise, progress=False, callback=steps.append)
        ref = K_SAMPLERS["euler"](denoiser, init + noise * schedule[-4], schedule[-4:], progress=False)
    assert steps == [0, 1, 2]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(UserError, match="strength"):
        k.sample_img2img(10, init, 1.5, ctx)


def test_denoiser_blends_the_known_latent_into_every_estimate(eps_model):
    ctx, _ = contexts()
    k = KDiffusionSampler(eps_model)
    x0, x = latent(9), latent(10) * 3
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1  # keep the left half
    plain = k.denoiser(ctx)(x, 3.0)
    blended = k.denoiser(ctx, mask=mask, x0=x0)(x, 3.0)
    torch.testing.assert_close(blended[..., :4], x0[..., :4], rtol=0, atol=0)
    torch.testing.assert_close(blended[..., 4:], plain[..., 4:], rtol=0, atol=0)
    with pytest.raises(UserError, match="mask needs x0"):
        k.denoiser(ctx, mask=mask)


@pytest.mark.parametrize("sampler", list(K_SAMPLERS))
def test_inpainting_keeps_the_known_region(sampler, eps_model):
    x0 = latent(9)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    with torch.no_grad():
        torch.manual_seed(0)
        out = run(eps_model, sampler, "karras", steps=4, mask=mask, x0=x0)
    torch.testing.assert_close(out[..., :4], x0[..., :4], rtol=0, atol=1e-4)
    assert (out[..., 4:] - x0[..., 4:]).abs().mean() > 0.1


# ------------------------------------------------------------------------------------ refusals
def test_refuses_unknown_names_eta_and_unsupported_options(eps_model):
    with pytest.raises(UserError, match="unknown sampler 'euler_a'"):
        KDiffusionSampler(eps_model, "euler_a")
    with pytest.raises(UserError, match="unknown schedule 'Karras'"):
        KDiffusionSampler(eps_model, "euler", "Karras")
    with pytest.raises(UserError, match="sigmas must be strictly descending"):
        KDiffusionSampler(eps_model, "euler", sigmas="1 2")
    with pytest.raises(UserError, match="takes no eta"):
        run(eps_model, "euler_ancestral", eta=0.5)
    with pytest.raises(NotImplementedError, match="score_corrector"):
        run(eps_model, score_corrector=object())
    with pytest.raises(UserError, match="steps must be a positive integer"):
        run(eps_model, steps=0)
