"""The eps / x0 / v algebra: conversions round-trip and match the definitions."""
import torch

from ldm.models.diffusion import schedule
from ldm.modules.diffusionmodules.util import make_beta_schedule


def coefficients():
    buffers = schedule.schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    t = torch.tensor([0, 250, 999])
    a = buffers["sqrt_alphas_cumprod"][t].double().reshape(-1, 1, 1, 1)
    s = buffers["sqrt_one_minus_alphas_cumprod"][t].double().reshape(-1, 1, 1, 1)
    return a, s


def test_conversions_round_trip():
    a, s = coefficients()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g).double(), torch.randn(3, 4, 5, 5, generator=g).double()
    x_t = schedule.q_sample(x0, eps, a, s)
    v = schedule.v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(schedule.x0_from_v(x_t, v, a, s), x0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, v, a, s), eps)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, eps, a, s), x0)
    torch.testing.assert_close(schedule.eps_from_x0(x_t[1:], x0[1:], a[1:], s[1:]), eps[1:])


def test_buffers_are_consistent():
    b = schedule.schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    assert set(b) == set(schedule.SCHEDULE_BUFFERS)
    torch.testing.assert_close(b["sqrt_alphas_cumprod"] ** 2 + b["sqrt_one_minus_alphas_cumprod"] ** 2,
                               torch.ones(1000))
    torch.testing.assert_close(b["alphas_cumprod_prev"][1:], b["alphas_cumprod"][:-1])
    assert b["posterior_variance"][0] == 0
    w = schedule.lvlb_weights(b, "eps")
    assert torch.isfinite(w).all() and w[0] == w[1]
    assert torch.equal(schedule.lvlb_weights(b, "v"), torch.ones(1000))


def test_model_methods_use_the_same_algebra(tiny):
    model = tiny.build(tiny.config(cond_stage_config={"target": "torch.nn.Identity"}))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    x_t = model.q_sample(x0, t, noise=eps)
    v = model.get_v(x0, eps, t)
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict_start_from_noise(x_t, t, eps), x0, atol=1e-4, rtol=1e-4)
