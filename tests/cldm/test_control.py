"""ControlNet inputs through the one guided model call: the official {"c_concat": [hint]} layout with the
unconditional side lacking control (guess mode), several ControlNets summed, step ranges."""
import copy

import pytest
import torch
from tiny_models import build_tiny_model, controlnet_config

from cldm.control import ControlHint, control_inputs
from ldm.models.diffusion.guidance import GuidedModel, _cat_conditioning
from ldm.modules.partial_conditioning import PartialConditioning

SCALES = (1.0,) * 5   # the tiny ControlNet has 4 input blocks and a middle block


@pytest.fixture(scope="module")
def trained():
    return build_tiny_model(controlnet_config(), seed=1)


@pytest.fixture(scope="module")
def second(trained):
    """Another ControlNet of the same architecture, with other weights."""
    net = copy.deepcopy(trained.control_model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10, 500][:n]), torch.randn(n, 5, 32, generator=g),
            torch.randn(n, 5, 32, generator=g), torch.rand(n, 3, 64, 64, generator=g))


def unet(model, x, t, context, control=None):
    return model.model.diffusion_model(x, t, context=context, control=control)


def test_a_side_without_an_entry_stacks_as_partial_conditioning():
    hint = torch.rand(2, 3, 64, 64)
    stacked = _cat_conditioning({"c_concat": None, "c_crossattn": [torch.zeros(2, 5, 32)]},
                                {"c_concat": [hint], "c_crossattn": [torch.ones(2, 5, 32)]}, ((0, 2), (2, 4)))
    assert stacked["c_crossattn"][0].shape == (4, 5, 32)
    assert stacked["c_concat"] == PartialConditioning([hint], slice(2, 4))
    assert _cat_conditioning([None], [None], ((0, 2), (2, 4))) == [None]
    with pytest.raises(ValueError, match="differ in length"):
        _cat_conditioning([hint], [hint, hint], ((0, 2), (2, 4)))


@torch.no_grad()
def test_guess_mode_runs_the_unconditional_half_without_control(trained):
    """lllyasviel/ControlNet's guess mode: uncond {"c_concat": None}, cond {"c_concat": [hint]}, one batch."""
    x, t, c, uc, hint = inputs()
    guided = GuidedModel(trained, {"c_concat": [hint], "c_crossattn": [c]},
                         {"c_concat": None, "c_crossattn": [uc]}, scale=3.0)
    # the stacked call: its unconditional rows are the plain U-Net's exactly
    seen = {}
    original = trained.apply_model

    def spy(x_, t_, cond):
        seen["out"] = original(x_, t_, cond)
        return seen["out"]
    trained.apply_model = spy
    try:
        out = guided(x, t)
    finally:
        del trained.apply_model
    plain = unet(trained, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c]))
    assert torch.equal(seen["out"][:2], plain[:2])
    with_control = trained.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [c]})
    without = trained.apply_model(x, t, {"c_concat": None, "c_crossattn": [uc]})
    torch.testing.assert_close(out, without + 3.0 * (with_control - without), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_control, unet(trained, x, t, c), atol=1e-3)   # the control does act


@torch.no_grad()
def test_several_controlnets_add_their_residuals(trained, second):
    x, t, c, _, hint = inputs()
    other_hint = torch.rand(2, 3, 64, 64)
    scales = (0.5, 1.0, 1.5, 0.2, 0.8)
    units = [ControlHint(hint, scales), ControlHint(other_hint, SCALES, second, global_average_pooling=True)]
    out = trained.apply_model(x, t, {"c_crossattn": [c], "c_concat": units})
    first = trained.control_residuals(x, t, c, hint, scales=scales)
    pooled = [r.mean(dim=(2, 3), keepdim=True) for r in trained.control_residuals(x, t, c, other_hint, second)]
    assert torch.equal(out, unet(trained, x, t, c, [a + b for a, b in zip(first, pooled)]))


@torch.no_grad()
def test_weight_zero_and_units_outside_their_steps_leave_the_plain_unet(trained, second):
    x, t, c, _, hint = inputs()
    plain = unet(trained, x, t, c)
    zero = [ControlHint(hint, (0.0,) * 5), ControlHint(hint, (0.0,) * 5, second)]
    assert torch.equal(trained.apply_model(x, t, {"c_crossattn": [c], "c_concat": zero}), plain)
    late = ControlHint(hint, SCALES, steps=10, start=0.5, end=1.0)
    assert late.at(4) is None and late.at(5) is late and late.at(9) is late
    early = ControlHint(hint, SCALES, steps=10, start=0.0, end=0.3)
    assert [early.at(i) is early for i in range(5)] == [True, True, True, True, False]
    guided = GuidedModel(trained, {"c_crossattn": [c], "c_concat": [late]}, {"c_crossattn": [c], "c_concat": [late]},
                         scale=2.0)
    guided.step = 2
    assert torch.equal(guided(x, t), unet(trained, torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c])).chunk(2)[1])


@torch.no_grad()
def test_a_guess_mode_unit_beside_a_balanced_one(trained, second):
    """Per unit: the unconditional side has the balanced unit only; stacked, the guess-mode unit acts on
    the conditional rows alone."""
    x, t, c, uc, hint = inputs()
    balanced, guess = ControlHint(hint, SCALES), ControlHint(hint, SCALES, second)
    stacked = _cat_conditioning({"c_crossattn": [uc], "c_concat": [balanced, None]},
                                {"c_crossattn": [c], "c_concat": [balanced, guess]}, ((0, 2), (2, 4)))
    (both, rows_both), (only, rows_only) = control_inputs(stacked["c_concat"])
    assert rows_both is None and both.hint.shape[0] == 4
    assert rows_only == slice(2, 4) and only is guess
    out = trained.apply_model(torch.cat([x, x]), torch.cat([t, t]), stacked)
    torch.testing.assert_close(out[:2], trained.apply_model(x, t, {"c_crossattn": [uc], "c_concat": [balanced]}),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:], trained.apply_model(x, t, {"c_crossattn": [c], "c_concat": [balanced, guess]}),
                               rtol=1e-5, atol=1e-5)


def test_a_hint_of_the_wrong_size_is_named(trained):
    from ldm.errors import UserError
    x, t, c, _, _ = inputs()
    with pytest.raises(UserError, match="the hint is 32x32 pixels but this latent needs 64x64"):
        trained.apply_model(x, t, {"c_crossattn": [c], "c_concat": [torch.rand(2, 3, 32, 32)]})
