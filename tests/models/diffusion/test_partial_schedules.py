"""img2img partial schedules (strength) for PLMS and DPM-Solver++, and DPM-Solver++ inpainting by blending.

The sigma samplers' partial schedules are tested in test_k_sampling.py, DDIM's in test_samplers.py.
"""
import pytest
import torch

from ldm.errors import UserError
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.dpm_solver.dpm_solver import NoiseScheduleVP
from ldm.models.diffusion.plms import PLMSSampler

SHAPE = [4, 8, 8]


def tensor(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CTX, UCTX = tensor(1, 2, 7, 32), tensor(2, 2, 7, 32)


def latent(seed):
    return tensor(seed, 2, *SHAPE)


def record_timesteps(model, monkeypatch):
    seen = []
    original = model.apply_model

    def apply_model(x, t, cond):
        seen.append(float(t[0]))
        return original(x, t, cond)

    monkeypatch.setattr(model, "apply_model", apply_model)
    return seen


# ------------------------------------------------------------------------------------------ PLMS
def test_plms_decode_over_all_steps_is_plms_sampling(eps_model):
    sampler = PLMSSampler(eps_model, device="cpu")
    with torch.no_grad():
        full, _ = sampler.sample(S=6, batch_size=2, shape=SHAPE, conditioning=CTX, x_T=latent(3), verbose=False,
                                 unconditional_guidance_scale=3.0, unconditional_conditioning=UCTX, progress=False)
        decoded = sampler.decode(latent(3), CTX, 6, unconditional_guidance_scale=3.0, unconditional_conditioning=UCTX,
                                 progress=False)
    torch.testing.assert_close(decoded, full, rtol=0, atol=0)


def test_plms_decode_runs_the_first_t_start_ddim_timesteps_from_the_top(eps_model, monkeypatch):
    sampler = PLMSSampler(eps_model, device="cpu")
    sampler.make_schedule(10, verbose=False)
    seen = record_timesteps(eps_model, monkeypatch)
    with torch.no_grad():
        out = sampler.decode(latent(3), CTX, 4, progress=False)
    timesteps = [float(t) for t in sampler.ddim_timesteps]
    # the pseudo improved-Euler first step evaluates at t_3 and again at t_2, then one evaluation per step
    assert seen == [timesteps[3], timesteps[2], timesteps[2], timesteps[1], timesteps[0]]
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(sampler.decode(latent(3), CTX, 0, progress=False), latent(3))


# ------------------------------------------------------------------------------------ DPM-Solver++
def test_dpm_img2img_at_strength_one_is_a_full_sample(eps_model):
    sampler = DPMSolverSampler(eps_model, device="cpu")
    init, noise = latent(5), latent(6)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=eps_model.alphas_cumprod.float())
    one = torch.ones(1)
    with torch.no_grad():
        out = sampler.sample_img2img(8, init, 1.0, CTX, 3.0, UCTX, noise=noise, progress=False)
        x_T = ns.marginal_alpha(one) * init + ns.marginal_std(one) * noise
        full, _ = sampler.sample(S=8, batch_size=2, shape=SHAPE, conditioning=CTX, x_T=x_T, verbose=False,
                                 unconditional_guidance_scale=3.0, unconditional_conditioning=UCTX, progress=False)
        assert sampler.sample_img2img(8, init, 0.0, CTX, 3.0, UCTX, noise=noise, progress=False) is init
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_dpm_img2img_runs_the_last_strength_times_steps_from_a_noised_latent(eps_model, monkeypatch):
    sampler = DPMSolverSampler(eps_model, device="cpu")
    init, noise = latent(5), latent(6)
    seen = record_timesteps(eps_model, monkeypatch)
    with torch.no_grad():
        sampler.sample_img2img(10, init, 0.45, CTX, noise=noise, progress=False)   # int(4.5) = 4 steps
    # the full run's times are uniform from 1 to 1/1000 in 10 steps; the last 4 start at t = 1 - 6 * 0.0999;
    # the model sees t_model = 1000 * (t - 1/1000), one evaluation per step (the final one is never needed)
    grid = torch.linspace(1.0, 1e-3, 11)
    expected = [float((t - 1e-3) * 1000) for t in grid[6:10]]
    assert seen == pytest.approx(expected, abs=1e-3)
    with pytest.raises(UserError, match="strength"):
        sampler.sample_img2img(10, init, 1.2, CTX)


def test_dpm_inpainting_keeps_the_known_latent(eps_model):
    """Where the mask is 1 the data prediction is the known latent, so the solver follows the exact
    path of a constant x0: x_t = alpha_t x0 + sigma_t / sigma_T (x_T - alpha_T x0)."""
    sampler = DPMSolverSampler(eps_model, device="cpu")
    known, x_T = latent(7), latent(8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    with torch.no_grad():
        out, _ = sampler.sample(S=6, batch_size=2, shape=SHAPE, conditioning=CTX, x_T=x_T, mask=mask, x0=known,
                                verbose=False, unconditional_guidance_scale=3.0, unconditional_conditioning=UCTX,
                                progress=False)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=eps_model.alphas_cumprod.float())
    t_T, t_0 = torch.ones(1), torch.full((1,), 1e-3)
    a_T, s_T, a_0, s_0 = ns.marginal_alpha(t_T), ns.marginal_std(t_T), ns.marginal_alpha(t_0), ns.marginal_std(t_0)
    expected = a_0 * known + s_0 / s_T * (x_T - a_T * known)
    torch.testing.assert_close(out[..., :4], expected[..., :4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[..., 4:], expected[..., 4:], atol=1e-2)
