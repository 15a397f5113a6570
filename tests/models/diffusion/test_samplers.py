"""Every sampler x {eps, v} x {tensor, dict conditioning} on a tiny model, plus their invariants."""
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}
SHAPE = [4, 8, 8]


def contexts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)


def start_code(seed=4):
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(seed))


def run(sampler_name, model, cond, uncond, scale, steps=5, eta=0.0, x_T=None, **kw):
    sampler = SAMPLERS[sampler_name](model, device="cpu")
    samples, _ = sampler.sample(S=steps, batch_size=2, shape=SHAPE, conditioning=cond, verbose=False, eta=eta,
                                x_T=start_code() if x_T is None else x_T, unconditional_guidance_scale=scale,
                                unconditional_conditioning=uncond, progress=False, **kw)
    return samples


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("dict_cond", [False, True])
def test_every_sampler_runs_for_eps_v_and_dict_conditioning(sampler_name, parameterization, dict_cond,
                                                            eps_model, v_model):
    model = eps_model if parameterization == "eps" else v_model
    ctx, uctx = contexts()
    cond, uncond = (({"c_crossattn": [ctx]}, {"c_crossattn": [uctx]}) if dict_cond else (ctx, uctx))
    with torch.no_grad():
        out = run(sampler_name, model, cond, uncond, 3.0)
        ref = run(sampler_name, model, ctx, uctx, 3.0)
    assert out.shape == (2, *SHAPE)
    assert torch.isfinite(out).all()
    # a dict {"c_crossattn": [c]} is the same conditioning as the bare tensor
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_deterministic_at_eta_zero(sampler_name, eps_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        torch.manual_seed(0)
        a = run(sampler_name, eps_model, ctx, uctx, 3.0)
        torch.manual_seed(99)  # a different global RNG state must not matter at eta 0
        b = run(sampler_name, eps_model, ctx, uctx, 3.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_eta_positive_depends_on_the_seed(eps_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        torch.manual_seed(0)
        a = run("ddim", eps_model, ctx, uctx, 3.0, eta=1.0)
        torch.manual_seed(1)
        b = run("ddim", eps_model, ctx, uctx, 3.0, eta=1.0)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_guidance_scale_one_equals_the_conditional_call(sampler_name, eps_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        guided_one = run(sampler_name, eps_model, ctx, uctx, 1.0)
        cond_only = run(sampler_name, eps_model, ctx, None, 1.0)
        guided_three = run(sampler_name, eps_model, ctx, uctx, 3.0)
    torch.testing.assert_close(guided_one, cond_only, rtol=0, atol=0)
    assert (guided_three - cond_only).abs().max() > 1e-4


class VFromEps:
    """Presents an eps-model as a v-model: v = sqrt(a) eps - sqrt(1-a) x0, with x0 recovered from eps.

    A sampler that handles v correctly must produce the same samples from both."""

    def __init__(self, eps_model):
        self.inner = eps_model
        self.parameterization = "v"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_model(self, x, t, cond):
        eps = self.inner.apply_model(x, t, cond)
        a, s = self._coefficients(t, x)
        x0 = (x - s * eps) / a
        return a * eps - s * x0

    def _coefficients(self, t, x):
        if t.is_floating_point():
            # DPM-Solver passes fractional timesteps: interpolate alpha_bar the same way it does
            from ldm.models.diffusion.dpm_solver.dpm_solver import NoiseScheduleVP
            ns = NoiseScheduleVP("discrete", alphas_cumprod=self.inner.alphas_cumprod)
            tc = t / 1000. + 1. / ns.total_N
            a, s = ns.marginal_alpha(tc), ns.marginal_std(tc)
        else:
            a, s = self.inner.sqrt_alphas_cumprod[t], self.inner.sqrt_one_minus_alphas_cumprod[t]
        return a.reshape(-1, 1, 1, 1).to(x), s.reshape(-1, 1, 1, 1).to(x)


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_v_model_gives_the_same_samples_as_the_equivalent_eps_model(sampler_name, eps_model):
    """Catches the official PLMS bug (treating v as eps), which gives a completely different image."""
    ctx, uctx = contexts()
    with torch.no_grad():
        from_eps = run(sampler_name, eps_model, ctx, uctx, 3.0, steps=6)
        from_v = run(sampler_name, VFromEps(eps_model), ctx, uctx, 3.0, steps=6)
    torch.testing.assert_close(from_v, from_eps, rtol=1e-4, atol=2e-4)


def test_ddim_draws_one_noise_tensor_per_step_even_at_eta_zero(eps_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        torch.manual_seed(5)
        run("ddim", eps_model, ctx, uctx, 3.0, steps=4)
        after_sampling = torch.randn(1)
        torch.manual_seed(5)
        for _ in range(4):
            torch.randn(2, *SHAPE)
        expected = torch.randn(1)
    torch.testing.assert_close(after_sampling, expected, rtol=0, atol=0)


def test_ddim_start_code_is_drawn_from_the_global_rng(eps_model):
    ctx, _ = contexts()
    sampler = DDIMSampler(eps_model, device="cpu")
    with torch.no_grad():
        torch.manual_seed(11)
        a, _ = sampler.sample(S=3, batch_size=2, shape=SHAPE, conditioning=ctx, verbose=False, progress=False)
        torch.manual_seed(11)
        x_T = torch.randn(2, *SHAPE)
        b, _ = sampler.sample(S=3, batch_size=2, shape=SHAPE, conditioning=ctx, verbose=False, x_T=x_T,
                              progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plms_rejects_nonzero_eta(eps_model):
    from ldm.errors import UserError
    with pytest.raises(UserError, match="eta"):
        PLMSSampler(eps_model).make_schedule(10, ddim_eta=0.5, verbose=False)


def test_img2img_encode_decode(eps_model):
    """stochastic_encode at DDIM index t mixes x0 and noise with sqrt(alpha_bar) weights, and
    decode from t_start runs exactly t_start steps."""
    ctx, uctx = contexts()
    sampler = DDIMSampler(eps_model, device="cpu")
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    x0 = start_code(7)
    noise = start_code(8)
    t_enc = 6
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 2), noise=noise)
    a = sampler.ddim_alphas[t_enc]
    torch.testing.assert_close(z, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    steps = []
    with torch.no_grad():
        out = sampler.decode(z, ctx, t_enc, unconditional_guidance_scale=3.0, unconditional_conditioning=uctx,
                             callback=steps.append, progress=False)
    assert steps == list(range(t_enc))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_mask_keeps_the_known_region(eps_model):
    """With mask = 1 everywhere the result is x0 noised to the last step: close to x0."""
    ctx, _ = contexts()
    x0 = start_code(9).clamp(-1, 1)
    mask = torch.ones(2, *SHAPE)
    with torch.no_grad():
        out = run("ddim", eps_model, ctx, None, 1.0, steps=10, mask=mask, x0=x0)
    # the final DDIM step starts from q(x_1 | x0), then denoises once more
    assert (out - x0).abs().mean() < 0.2


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_guidance_rescale_reaches_every_sampler(sampler_name, eps_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        plain = run(sampler_name, eps_model, ctx, uctx, 5.0)
        phi_zero = run(sampler_name, eps_model, ctx, uctx, 5.0, guidance_rescale=0.0)
        rescaled = run(sampler_name, eps_model, ctx, uctx, 5.0, guidance_rescale=0.7)
    torch.testing.assert_close(phi_zero, plain, rtol=0, atol=0)
    assert torch.isfinite(rescaled).all() and (rescaled - plain).abs().max() > 1e-4


# ------------------------------------------------------------------ zero terminal SNR (Lin et al. 2023)
@pytest.fixture(scope="module")
def zero_snr_v_model(tiny):
    config = tiny.config(parameterization="v", rescale_betas_zero_snr=True,
                         cond_stage_config={"target": "torch.nn.Identity"})
    model = tiny.build(config, seed=1)
    assert model.alphas_cumprod[-1] == 0
    return model


def spacing_for(sampler_name, spacing="trailing"):
    # DPM-Solver keeps its own time-uniform schedule, which always starts at the last timestep
    return {} if sampler_name == "dpm" else {"timestep_spacing": spacing}


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_zero_snr_v_model_samples_from_the_last_timestep_without_nan(sampler_name, zero_snr_v_model):
    ctx, uctx = contexts()
    with torch.no_grad():
        out = run(sampler_name, zero_snr_v_model, ctx, uctx, 5.0, steps=4, guidance_rescale=0.7,
                  **spacing_for(sampler_name))
    assert torch.isfinite(out).all()


def test_first_step_from_pure_noise_is_the_ddim_step_for_every_sampler(zero_snr_v_model):
    """From alpha_bar = 0 one step down to alpha_bar_0 is x = sqrt(a_0) x0 + sqrt(1 - a_0) x_T with
    x0 = -v (the v-model's own prediction at a = 0); PLMS takes exactly that step there and
    DPM-Solver (order 1) nearly, on its clamped terminal alpha_bar."""
    ctx, uctx = contexts()
    x_T = start_code()
    a0 = zero_snr_v_model.alphas_cumprod[0]
    with torch.no_grad():
        v = GuidedModel(zero_snr_v_model, ctx, uctx, 5.0)(x_T, torch.tensor([999, 999]))
        expected = a0.sqrt() * -v + (1 - a0).sqrt() * x_T
        ddim = run("ddim", zero_snr_v_model, ctx, uctx, 5.0, steps=1, timestep_spacing="trailing")
        plms = run("plms", zero_snr_v_model, ctx, uctx, 5.0, steps=1, timestep_spacing="trailing")
        dpm = run("dpm", zero_snr_v_model, ctx, uctx, 5.0, steps=1, order=1)
    torch.testing.assert_close(ddim, expected)
    torch.testing.assert_close(plms, ddim, rtol=0, atol=0)
    torch.testing.assert_close(dpm, ddim, rtol=0, atol=2e-3)


def test_dpm_solver_log_snr_stays_finite_at_zero_terminal_snr(zero_snr_v_model):
    ns = DPMSolverSampler(zero_snr_v_model, device="cpu").noise_schedule()
    lam = ns.marginal_lambda(ns.t_array)
    assert torch.isfinite(lam).all() and torch.all(lam[1:] < lam[:-1])


class AsEpsModel:
    """A zero-terminal-SNR model presented as an eps-model (as a checkpoint with such buffers and an eps
    config would load)."""
    parameterization = "eps"

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_eps_model_at_zero_snr_is_refused_where_it_reaches_the_last_timestep(sampler_name, zero_snr_v_model):
    from ldm.errors import UserError
    ctx, _ = contexts()
    eps_view = AsEpsModel(zero_snr_v_model)
    with pytest.raises(UserError, match="timestep 999, where alpha_bar is 0 .* eps-prediction model cannot"):
        run(sampler_name, eps_view, ctx, None, 1.0, steps=3, **spacing_for(sampler_name))
    if sampler_name != "dpm":  # the official leading spacing never reaches it
        with torch.no_grad():
            assert torch.isfinite(run(sampler_name, eps_view, ctx, None, 1.0, steps=3)).all()


def test_dpm_solver_takes_no_timestep_spacing(eps_model):
    from ldm.errors import UserError
    ctx, _ = contexts()
    with pytest.raises(UserError, match="DPM-Solver steps uniformly in time .* no timestep_spacing"):
        run("dpm", eps_model, ctx, None, 1.0, timestep_spacing="trailing")
