"""``approximated`` and the generation API: off means the exact images, every sampler runs with the speed-ups on,
and the model is exact again afterwards, whatever happened inside."""
import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.generate import txt2img
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.modules.speedups import approximated, recorded_settings
from tiny_models import build_tiny_model

ALL_ON = dict(deepcache=2, tome=0.5, int8=True)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def generate(model, **options):
    return pixels(txt2img(model, "a red circle", steps=4, n_samples=2, progress=False, **options))


def is_exact(model):
    unet = model.model.diffusion_model
    return ("run_listeners" not in vars(model) and not any("forward" in vars(m) for m in unet.modules())
            and not any(m._forward_pre_hooks for m in unet.modules())
            and all(type(m).__module__.startswith(("torch.nn.modules", "ldm.")) for m in unet.modules()))


def test_off_gives_the_images_of_a_plain_sampler_run(model):
    from ldm.generate import _decode, make_sampler, seed_everything, text_conditioning, Sampling
    default = generate(model)
    assert np.array_equal(generate(model, deepcache=0, deepcache_depth=None, tome=0.0, int8=False), default)
    assert np.array_equal(generate(model, deepcache=1), default)
    # the same draws without the generation API's speed-up scope
    sampling = Sampling(steps=4, n_samples=2)
    with torch.no_grad():
        cond, uncond = text_conditioning(model, ["a red circle"] * 2, sampling)
        sampler = make_sampler("ddim", model)
        seed_everything(sampling.seed)
        samples, _ = sampler.sample(S=4, conditioning=cond, batch_size=2, shape=[4, 8, 8], verbose=False,
                                    unconditional_guidance_scale=sampling.scale, unconditional_conditioning=uncond,
                                    progress=False)
        assert np.array_equal(pixels(_decode(model, samples)), default)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_with_every_speedup_on(model, sampler):
    images = generate(model, sampler=sampler, **ALL_ON)
    assert images.shape == (2, 16, 16, 3) and images.std() > 0
    assert is_exact(model)


def test_the_model_is_exact_again_after_an_error_inside(model):
    exact = generate(model)
    with pytest.raises(RuntimeError, match="inside"), approximated(model, **ALL_ON):
        assert not is_exact(model)
        raise RuntimeError("inside")
    assert is_exact(model)
    assert np.array_equal(generate(model), exact)


@pytest.mark.parametrize("options, message", [
    (dict(deepcache=-1), "step-caching interval must be a whole number"),
    (dict(deepcache=2, deepcache_depth=9), "step-caching depth must be a whole number from 0 to 3"),
    (dict(int8=True, tome=0.5, deepcache=2, deepcache_depth=9), "from 0 to 3"),
    (dict(deepcache_depth=-1), "step-caching depth must be a whole number, 0 or more"),
    (dict(tome=0.9), "token-merging ratio must be from 0"),
    (dict(int8="yes"), "int8 is True or False"),
])
def test_impossible_settings_are_one_line_errors(model, options, message):
    with pytest.raises(UserError, match=message) as err:
        generate(model, **options)
    assert "\n" not in str(err.value)
    assert is_exact(model)


def test_recorded_settings_name_only_what_is_on():
    assert recorded_settings() == {} and recorded_settings(deepcache=1, deepcache_depth=3) == {}
    assert recorded_settings(**ALL_ON) == {"deepcache": 2, "deepcache_depth": 0, "tome": 0.5, "int8": True}
