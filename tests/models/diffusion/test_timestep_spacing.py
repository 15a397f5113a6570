"""DDIM/PLMS timestep spacings ("leading", "trailing", "linspace"), against arrays written out from
diffusers' documented definitions (``DDIMScheduler.set_timesteps``), for S steps over T timesteps:

    leading   arange(0, S) * (T // S) + steps_offset (1 for SD, the official numbers)
    trailing  round(arange(T, 0, -T / S)) - 1
    linspace  round(linspace(0, T - 1, S))       (numpy rounds halves to even)
"""
import numpy as np
import pytest

from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps

EXPECTED = {
    # T = 1000, S = 10: stride 100; trailing 1000 - 100 i - 1; linspace 999 / 9 = 111 exactly
    ("leading", 1000, 10): [1, 101, 201, 301, 401, 501, 601, 701, 801, 901],
    ("trailing", 1000, 10): [99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
    ("linspace", 1000, 10): [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    # T = 1000, S = 3: stride 333; trailing 1000, 666.67, 333.33 -> 1000, 667, 333 -> minus 1;
    # linspace 0, 499.5, 999 -> 499.5 rounds to the even 500
    ("leading", 1000, 3): [1, 334, 667],
    ("trailing", 1000, 3): [332, 666, 999],
    ("linspace", 1000, 3): [0, 500, 999],
    # T = 50, S = 7: stride 7; trailing 50 - 7.142857 i = 50, 42.86, 35.71, 28.57, 21.43, 14.29,
    # 7.14 -> 50, 43, 36, 29, 21, 14, 7 -> minus 1; linspace 49 / 6 = 8.1667 i -> 0, 8.17, 16.33,
    # 24.5 (even: 24), 32.67, 40.83, 49
    ("leading", 50, 7): [1, 8, 15, 22, 29, 36, 43],
    ("trailing", 50, 7): [6, 13, 20, 28, 35, 42, 49],
    ("linspace", 50, 7): [0, 8, 16, 24, 33, 41, 49],
}


@pytest.mark.parametrize("spacing, num_train, steps", list(EXPECTED))
def test_spacings_match_diffusers_definitions(spacing, num_train, steps):
    ts = make_ddim_timesteps(spacing, steps, num_train, verbose=False)
    np.testing.assert_array_equal(ts, EXPECTED[spacing, num_train, steps])


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 25, 50, 250, 999, 1000])
def test_official_uniform_numbers_are_unchanged_and_leading_is_the_same(steps):
    # the official make_ddim_timesteps: c = T // S; arange(0, T, c) + 1 (cut to S steps when
    # T % S leaves one too many)
    official = (np.arange(0, 1000, 1000 // steps) + 1)[:steps]
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", steps, 1000, verbose=False), official)
    np.testing.assert_array_equal(make_ddim_timesteps("leading", steps, 1000, verbose=False), official)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 999, 1000])
def test_trailing_and_linspace_reach_the_last_timestep_with_the_requested_count(steps):
    for spacing in ("trailing", "linspace") if steps > 1 else ("trailing",):  # linspace(0, T-1, 1) is [0]
        ts = make_ddim_timesteps(spacing, steps, 1000, verbose=False)
        assert len(ts) == steps and ts[-1] == 999 and np.all(np.diff(ts) > 0)


def test_unknown_spacing_is_a_user_error():
    with pytest.raises(UserError, match="unknown timestep spacing 'middle'.*trailing"):
        make_ddim_timesteps("middle", 10, 1000, verbose=False)


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_samplers_take_the_spacing(sampler_class, tiny):
    model = tiny.build(tiny.config(cond_stage_config={"target": "torch.nn.Identity"}))
    sampler = sampler_class(model, device="cpu")
    sampler.make_schedule(10, verbose=False, timestep_spacing="trailing")
    np.testing.assert_array_equal(sampler.ddim_timesteps, EXPECTED["trailing", 1000, 10])
    assert sampler.ddim_alphas[-1] == model.alphas_cumprod[999]
    sampler.make_schedule(10, verbose=False)  # the official default
    np.testing.assert_array_equal(sampler.ddim_timesteps, EXPECTED["leading", 1000, 10])
    with pytest.raises(UserError, match="not both"):
        sampler.make_schedule(10, ddim_discretize="quad", verbose=False, timestep_spacing="trailing")
