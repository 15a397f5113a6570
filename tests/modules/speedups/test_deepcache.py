"""Step caching: interval 1 is the exact U-Net; interval N runs the deep blocks on cache steps only, for every
sampler through the shared guided model call, and each sampling run starts afresh."""
import pytest
import torch

from ldm.errors import UserError
from ldm.generate import make_sampler, seed_everything
from ldm.modules.speedups import DeepCache, approximated
from tiny_models import build_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def unet_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    return x, torch.tensor([500, 20])[:batch], torch.randn(batch, 77, 32, generator=g)


def sample(model, sampler="ddim", steps=7, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    seed_everything(seed)
    with torch.no_grad():
        samples, _ = make_sampler(sampler, model).sample(S=steps, conditioning=cond, batch_size=1, shape=[4, 8, 8],
                                                         unconditional_guidance_scale=4.0,
                                                         unconditional_conditioning=uncond, verbose=False,
                                                         progress=False)
    return samples


class Calls:
    """Counts the forwards of some modules."""

    def __init__(self, **modules):
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._counter(name)) for name, m in modules.items()]

    def _counter(self, name):
        def hook(module, args, output):
            self.counts[name] += 1
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_interval_1_is_the_exact_unet(model):
    unet = model.model.diffusion_model
    x, t, context = unet_inputs()
    with torch.no_grad():
        exact = unet(x, t, context=context)
        cache = DeepCache(unet, 1).attach()
        try:
            cached = unet(x, t, context=context)
            samples = sample(model)
        finally:
            cache.remove()
        assert "forward" not in vars(unet)
        assert torch.equal(cached, exact)
        assert torch.equal(samples, sample(model))


@pytest.mark.parametrize("interval, depth", [(2, 1), (3, 0), (3, 2)])
def test_deep_blocks_run_on_cache_steps_only(model, interval, depth):
    unet = model.model.diffusion_model
    calls = Calls(middle=unet.middle_block, deep_input=unet.input_blocks[depth + 1],
                  shallow_input=unet.input_blocks[depth], last_output=unet.output_blocks[-1])
    steps = 7
    try:
        with approximated(model, deepcache=interval, deepcache_depth=depth):
            approximate = sample(model, steps=steps)
    finally:
        calls.remove()
    cache_steps = len(range(0, steps, interval))
    assert calls.counts == {"middle": cache_steps, "deep_input": cache_steps, "shallow_input": steps,
                            "last_output": steps}
    assert approximate.shape == (1, 4, 8, 8) and not torch.equal(approximate, sample(model, steps=steps))


def test_second_order_samplers_run_every_evaluation_of_a_cache_step_in_full(model):
    unet = model.model.diffusion_model
    calls = Calls(middle=unet.middle_block, out=unet.out)
    try:
        with approximated(model, deepcache=2):
            sample(model, sampler="heun", steps=5)   # two evaluations per step but the last
    finally:
        calls.remove()
    assert calls.counts == {"middle": 2 + 2 + 1, "out": 2 * 4 + 1}


def test_every_run_starts_with_a_full_step_and_repeats_itself(model):
    unet = model.model.diffusion_model
    with approximated(model, deepcache=3) as approximate:
        first = sample(model, sampler="dpm", steps=5)
        cache = model.run_listeners[0]
        assert cache.deep_evaluations == 2
        second = sample(model, sampler="dpm", steps=5)
        assert cache.deep_evaluations == 2
    assert torch.equal(first, second) and approximate is model
    assert "forward" not in vars(unet) and "run_listeners" not in vars(model)


def test_a_batch_of_another_shape_runs_in_full(model):
    unet = model.model.diffusion_model
    cache = DeepCache(unet, 4).attach()
    try:
        with torch.no_grad():
            cache.start_run()
            x, t, context = unet_inputs(batch=2)
            unet(x, t, context=context)
            cache.at_step(1)
            x1, t1, context1 = unet_inputs(batch=1)
            alone = unet(x1, t1, context=context1)
    finally:
        cache.remove()
    assert cache.deep_evaluations == 2
    with torch.no_grad():
        assert torch.equal(alone, unet(x1, t1, context=context1))


def test_refusals(model):
    unet = model.model.diffusion_model
    with pytest.raises(UserError, match="from 0 to 3 for this U-Net"):
        DeepCache(unet, 2, depth=4)
    with pytest.raises(UserError, match="whole number"):
        DeepCache(unet, 2.5)
    from cldm.cldm import ControlledUnetModel
    params = tiny_config()["model"]["params"]["unet_config"]["params"]
    with pytest.raises(UserError, match="plain U-Net; ControlledUnetModel"):
        DeepCache(ControlledUnetModel(**params), 2)
