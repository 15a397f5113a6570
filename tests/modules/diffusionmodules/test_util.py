"""Schedules and timestep embeddings against closed forms computed here."""
import math

import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.diffusionmodules.util import (make_beta_schedule, make_ddim_sampling_parameters, make_ddim_timesteps,
                                               timestep_embedding)


def test_linear_schedule_is_linear_in_sqrt_beta():
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    root = np.sqrt(betas)
    np.testing.assert_allclose(np.diff(root), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)


def test_cosine_schedule_matches_alpha_bar_formula():
    betas = make_beta_schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 8e-3) / (1 + 8e-3) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = np.cumprod(1 - betas)
    assert alpha_bar[499] == pytest.approx(f(500) / f(0), rel=1e-6)
    assert betas.max() <= 0.999


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown beta schedule"):
        make_beta_schedule("exponential", 10)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 999])
def test_uniform_ddim_timesteps_have_the_offset_and_the_requested_count(steps):
    ts = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert len(ts) == steps
    assert ts[0] == 1 and ts.max() <= 999
    assert np.all(np.diff(ts) == 1000 // steps)


def test_quad_ddim_timesteps_grow_quadratically():
    ts = make_ddim_timesteps("quad", 10, 1000, verbose=False) - 1
    expected = (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)
    np.testing.assert_array_equal(ts, expected)


def test_ddim_sigmas_closed_form():
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    ts = make_ddim_timesteps("uniform", 10, 1000, verbose=False)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, ts, eta=0.7, verbose=False)
    a = alphas_cumprod[ts].double().numpy()
    a_prev = np.concatenate([[alphas_cumprod[0].item()], a[:-1]])
    np.testing.assert_allclose(np.asarray(alphas_prev), a_prev, rtol=1e-7)
    np.testing.assert_allclose(sigmas.numpy(), 0.7 * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)), rtol=1e-7)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0., 3., 17.5])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 9).shape == (3, 9)
