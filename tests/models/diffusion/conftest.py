"""Tiny eps and v models whose conditioning is a plain context tensor, for the sampler tests."""
import pytest


def identity_cond_model(tiny, parameterization):
    """Tiny LatentDiffusion whose conditioning is a plain [B, 7, 32] context tensor."""
    config = tiny.config(parameterization=parameterization, conditioning_key="crossattn",
                         cond_stage_config={"target": "torch.nn.Identity"})
    return tiny.build(config, seed=1)


@pytest.fixture(scope="module")
def eps_model(tiny):
    return identity_cond_model(tiny, "eps")


@pytest.fixture(scope="module")
def v_model(tiny):
    return identity_cond_model(tiny, "v")
