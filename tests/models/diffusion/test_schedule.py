"""The eps / x0 / v algebra: conversions round-trip and match the definitions; the zero-terminal-SNR
schedule (Lin et al. 2023)."""
import numpy as np
import pytest
import torch

from ldm.errors import UserError
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


# ----------------------------------------------------------------------------- zero terminal SNR
def test_zero_terminal_snr_rescale_matches_the_papers_algorithm_by_hand():
    """Lin et al. 2023, Algorithm 1 on betas (0.1, 0.2, 0.3), worked by hand:
    alpha_bar = (0.9, 0.72, 0.504); sqrt = (0.948683, 0.848528, 0.709930); shift by the last and
    scale by 0.948683 / (0.948683 - 0.709930) = 3.973481 -> (0.948683, 0.550719, 0); squared
    (0.9, 0.303291, 0); alphas = (0.9, 0.303291 / 0.9, 0) -> betas (0.1, 0.663010, 1)."""
    betas = schedule.rescale_zero_terminal_snr([0.1, 0.2, 0.3])
    np.testing.assert_allclose(betas, [0.1, 0.6630099, 1.0], rtol=1e-6)


def test_zero_terminal_snr_schedule_ends_at_zero_keeps_the_first_and_decreases():
    plain = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    betas = schedule.rescale_zero_terminal_snr(plain)
    alpha_bar = np.cumprod(1 - betas)
    assert alpha_bar[-1] == 0
    assert alpha_bar[0] == pytest.approx(1 - plain[0], rel=1e-12)
    assert np.all(np.diff(alpha_bar) < 0)
    assert np.all((betas > 0) & (betas <= 1)) and betas[-1] == 1
    buffers = schedule.schedule_buffers(betas)
    assert buffers["alphas_cumprod"][-1] == 0 and buffers["sqrt_one_minus_alphas_cumprod"][-1] == 1
    # only x0-from-eps is undefined at the end; everything else stays finite
    finite = [k for k in schedule.SCHEDULE_BUFFERS if not k.startswith("sqrt_recip")]
    assert all(torch.isfinite(buffers[k]).all() for k in finite)


def test_finite_alphas_cumprod_replaces_only_a_zero_terminal_value():
    plain = schedule.schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"]
    assert schedule.finite_alphas_cumprod(plain) is plain and not schedule.has_zero_terminal_snr(plain)
    zero = schedule.schedule_buffers(schedule.rescale_zero_terminal_snr(make_beta_schedule("linear", 1000,
                                                                                            0.00085, 0.012)))
    acp = zero["alphas_cumprod"]
    assert schedule.has_zero_terminal_snr(acp)
    finite = schedule.finite_alphas_cumprod(acp)
    assert finite[-1] == pytest.approx(schedule.TERMINAL_ALPHA_BAR_FLOOR) and acp[-1] == 0
    assert torch.equal(finite[:-1], acp[:-1])
    assert torch.isfinite(((1 - finite) / finite).sqrt()).all()  # the k-diffusion sigmas


def test_model_option_rescales_the_schedule_and_refuses_eps(tiny):
    params = {"parameterization": "v", "cond_stage_config": {"target": "torch.nn.Identity"}}
    plain = tiny.build(tiny.config(**params))
    zero = tiny.build(tiny.config(rescale_betas_zero_snr=True, **params))
    assert not plain.rescale_betas_zero_snr and plain.alphas_cumprod[-1] > 0
    assert zero.rescale_betas_zero_snr and zero.alphas_cumprod[-1] == 0
    torch.testing.assert_close(zero.alphas_cumprod[0], plain.alphas_cumprod[0])
    assert torch.all(zero.alphas_cumprod[1:] < plain.alphas_cumprod[1:])
    assert torch.isfinite(zero.lvlb_weights).all()
    with pytest.raises(UserError, match="rescale_betas_zero_snr needs parameterization 'v'"):
        tiny.build(tiny.config(rescale_betas_zero_snr=True, cond_stage_config={"target": "torch.nn.Identity"}))
