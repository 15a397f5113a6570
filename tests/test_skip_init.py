"""ldm.skip_init: parameters are left alone, everything else a constructor computes is as in a normal build."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.util import zero_module
from ldm.skip_init import INIT_FUNCTIONS, skipped_weight_init
from ldm.util import instantiate_from_config
from tiny_models import tiny_config

HF_CLIP_TEXT = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"text_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, projection_dim=32)}}


def build(config):
    return instantiate_from_config(OmegaConf.create(config).model)


def test_layers_draw_no_random_numbers():
    before = torch.get_rng_state()
    with skipped_weight_init():
        torch.nn.Linear(64, 64), torch.nn.Conv2d(8, 8, 3), torch.nn.Embedding(10, 4), torch.nn.GroupNorm(2, 8)
    assert torch.equal(torch.get_rng_state(), before)


def test_plain_tensors_are_still_initialised_and_the_functions_come_back():
    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    with pytest.raises(RuntimeError, match="inside"), skipped_weight_init():
        buffer = torch.empty(3)
        assert torch.nn.init.ones_(buffer) is buffer and torch.equal(buffer, torch.ones(3))
        parameter = torch.nn.Parameter(torch.full((3,), 7.0))
        assert torch.nn.init.zeros_(parameter) is parameter and torch.equal(parameter, torch.full((3,), 7.0))
        raise RuntimeError("inside")
    assert {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS} == originals


def test_zero_initialised_output_layers_are_left_alone_too():
    conv = torch.nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(7.0)
    with skipped_weight_init():
        zero_module(conv)
    assert torch.all(conv.weight == 7)
    zero_module(conv)
    assert torch.all(conv.weight == 0) and torch.all(conv.bias == 0)


@pytest.mark.parametrize("text_encoder", ["tiny", "hugging face clip"])
def test_buffers_equal_those_of_a_normal_build(text_encoder):
    """Schedules, position ids, masks: every buffer that is no copy of a parameter (EMA) is computed."""
    # ZTSNR: the schedule that a checkpoint does not override
    params = dict(use_ema=True, rescale_betas_zero_snr=True, parameterization="v")
    if text_encoder != "tiny":
        params["cond_stage_config"] = HF_CLIP_TEXT
    config = tiny_config(**params)
    normal = build(config)
    with skipped_weight_init():
        skipped = build(config)
    normal_buffers = dict(normal.named_buffers())
    skipped_buffers = dict(skipped.named_buffers())
    assert normal_buffers.keys() == skipped_buffers.keys()
    compared = [k for k in normal_buffers if not k.startswith("model_ema.") or k in ("model_ema.decay",
                                                                                    "model_ema.num_updates")]
    assert {"alphas_cumprod", "lvlb_weights", "logvar", "model_ema.decay"} <= set(compared)
    assert any(k.endswith("position_ids") for k in compared) == (text_encoder != "tiny")
    different = [k for k in compared if not torch.equal(normal_buffers[k], skipped_buffers[k])]
    assert not different
