"""ControlLDM against a reference written here from the paper's equations (Zhang et al. 2023, eq. 2):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

The trainable copy F(.; Θc) runs the U-Net's encoder blocks on the latent, with the encoded hint
added after the input conv; each block's output goes through its zero conv Z(.; Θz2) and is added
to the locked U-Net's skip connection (the middle block's to the middle block's output).
"""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tiny_models import build_tiny_model, controlnet_config

from cldm.cldm import ControlNet, control_scales
from ldm.errors import UserError
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config

HINT_WIDTHS = [16, 16, 32, 32, 96, 96, 256, 32]   # the tiny model has 32 channels
HINT_STRIDES = [1, 1, 2, 1, 2, 1, 2, 1]


@pytest.fixture(scope="module")
def trained():
    """Every weight random, zero convs included: a ControlNet that does something."""
    return build_tiny_model(controlnet_config(), seed=1)


@pytest.fixture(scope="module")
def fresh():
    """As tool_add_control.py makes it: a random (stand-in for trained) U-Net, the control copy
    initialised from its encoder, the hint encoder's last conv and the zero convs at zero."""
    torch.manual_seed(2)
    model = instantiate_from_config(OmegaConf.create(controlnet_config()).model).eval()
    unet = model.model.diffusion_model
    with torch.no_grad():
        for param in unet.parameters():
            if param.abs().sum() == 0:
                param.normal_(0.0, 0.05)
        unet_state = unet.state_dict()
        for key, value in model.control_model.state_dict().items():
            if key in unet_state:
                value.copy_(unet_state[key])
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)      # pixel resolution: 8x the latent
    context = torch.randn(2, 5, 32, generator=g)
    return x, torch.tensor([10, 500]), context, hint


def cond(context, hint):
    return {"c_crossattn": [context], "c_concat": None if hint is None else [hint]}


# ----------------------------------------------------------------------------------- the reference
def reference_hint(control, hint):
    """Z(c; Θz1) with c the hint: 3x3 convs with SiLU between, stride 2 at the 3rd, 5th and 7th."""
    convs = [m for m in control.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    h = hint
    for i, conv in enumerate(convs):
        h = F.conv2d(h, conv.weight, conv.bias, stride=HINT_STRIDES[i], padding=1)
        h = F.silu(h) if i < len(convs) - 1 else h
    return h


def one_by_one(zero_conv, h):
    conv = zero_conv[0]
    return F.conv2d(h, conv.weight, conv.bias)


def reference_residuals(control, x, t, context, hint):
    """Z(F(x + Z(c; Θz1); Θc); Θz2) for every encoder block of the copy, the middle block last."""
    emb = control.time_embed(timestep_embedding(t, control.model_channels))
    h = control.input_blocks[0](x, emb, context) + reference_hint(control, hint)
    residuals = [one_by_one(control.zero_convs[0], h)]
    for block, zero_conv in zip(control.input_blocks[1:], control.zero_convs[1:]):
        h = block(h, emb, context)
        residuals.append(one_by_one(zero_conv, h))
    h = control.middle_block(h, emb, context)
    return residuals + [one_by_one(control.middle_block_out, h)]


def reference_unet(unet, x, t, context, residuals, only_mid=False):
    """The locked U-Net F(x; Θ) with residual i added to skip connection i, the last to the middle."""
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    h, skips = x, []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context) + residuals[-1]
    for block in unet.output_blocks:
        skip = skips.pop()
        if not only_mid:
            skip = skip + residuals[len(skips)]
        h = block(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h)


def plain_unet(model, x, t, context):
    return UNetModel.forward(model.model.diffusion_model, x, t, context=context)


# ----------------------------------------------------------------------------------- structure
def test_hint_encoder_and_zero_convs_as_released(fresh):
    control = fresh.control_model
    convs = [m for m in control.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == HINT_WIDTHS
    assert [c.stride[0] for c in convs] == HINT_STRIDES and all(c.kernel_size == (3, 3) for c in convs)
    assert [type(m).__name__ for m in control.input_hint_block][1::2] == ["SiLU"] * 7
    zeros = [convs[-1], *(z[0] for z in control.zero_convs), control.middle_block_out[0]]
    assert all(c.weight.abs().sum() == 0 and c.bias.abs().sum() == 0 for c in zeros)
    assert [z[0].kernel_size for z in control.zero_convs] == [(1, 1)] * len(control.input_blocks)
    assert control.num_residuals == len(fresh.control_scales) == 5
    assert not hasattr(control, "output_blocks") and not hasattr(control, "out")


def test_logvar_is_saved_and_sd_locked_chooses_what_trains(fresh):
    assert fresh.state_dict()["logvar"].shape == (1000,)
    control_params = {id(p) for p in fresh.control_model.parameters()}
    assert {id(p) for p in fresh.trainable_parameters()} == control_params
    fresh.sd_locked = False
    try:
        unet = fresh.model.diffusion_model
        decoder = {id(p) for p in [*unet.output_blocks.parameters(), *unet.out.parameters()]}
        assert {id(p) for p in fresh.trainable_parameters()} == control_params | decoder
    finally:
        fresh.sd_locked = True


# ----------------------------------------------------------------------------------- numerics
@torch.no_grad()
def test_residuals_match_the_reference(trained):
    x, t, context, hint = inputs()
    ours = trained.control_model(x=x, hint=hint, timesteps=t, context=context)
    ref = reference_residuals(trained.control_model, x, t, context, hint)
    assert len(ours) == len(ref) == 5
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape and b.abs().max() > 1e-3, i
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_controlled_output_matches_the_reference(trained):
    x, t, context, hint = inputs()
    ref = reference_unet(trained.model.diffusion_model, x, t, context,
                         reference_residuals(trained.control_model, x, t, context, hint))
    out = trained.apply_model(x, t, cond(context, hint))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out - plain_unet(trained, x, t, context)).abs().max() > 1e-3   # the control does something


@torch.no_grad()
def test_fresh_zero_convs_leave_the_unet_output_exactly_unchanged(fresh):
    x, t, context, hint = inputs()
    plain = plain_unet(fresh, x, t, context)
    assert plain.abs().max() > 1e-3
    assert all(r.abs().max() == 0 for r in fresh.control_model(x=x, hint=hint, timesteps=t, context=context))
    assert torch.equal(fresh.apply_model(x, t, cond(context, hint)), plain)
    assert torch.equal(fresh.apply_model(x, t, cond(context, None)), plain)
    assert torch.equal(fresh.apply_model(x, t, context), plain)   # text conditioning alone


def test_zero_convs_still_learn(fresh):
    """Zero weights give zero residuals but not zero gradients: dL/dW = input x upstream gradient."""
    x, t, context, hint = inputs()
    fresh.zero_grad()
    fresh.apply_model(x, t, cond(context, hint)).square().mean().backward()
    control = fresh.control_model
    grads = [z[0].weight.grad for z in control.zero_convs] + [control.middle_block_out[0].weight.grad]
    fresh.zero_grad()
    assert all(g is not None and g.abs().max() > 0 for g in grads)


@torch.no_grad()
def test_control_scales_weight_each_residual(trained):
    x, t, context, hint = inputs()
    scales = [0.1, 0.7, 1.3, 0.0, 2.0]
    ref = reference_unet(trained.model.diffusion_model, x, t, context,
                         [r * s for r, s in zip(reference_residuals(trained.control_model, x, t, context, hint),
                                                scales)])
    trained.control_scales = scales
    try:
        torch.testing.assert_close(trained.apply_model(x, t, cond(context, hint)), ref, rtol=1e-5, atol=1e-6)
        trained.control_scales = control_scales(0.0, count=5)
        assert torch.equal(trained.apply_model(x, t, cond(context, hint)), plain_unet(trained, x, t, context))
        trained.control_scales = control_scales(1.0, count=13)
        with pytest.raises(UserError, match="13 values .* 5 residuals"):
            trained.apply_model(x, t, cond(context, hint))
    finally:
        trained.control_scales = control_scales(1.0, count=5)


def test_guess_mode_scales():
    assert control_scales(0.8) == [0.8] * 13
    guess = control_scales(0.8, guess_mode=True)
    assert len(guess) == 13 and guess[-1] == 0.8
    assert guess == pytest.approx([0.8 * 0.825 ** (12 - i) for i in range(13)])
    assert 0.099 < guess[0] / 0.8 < 0.1   # the first skip at ~0.1 of the strength


@torch.no_grad()
def test_only_mid_control_adds_the_middle_residual_alone(trained):
    x, t, context, hint = inputs()
    residuals = reference_residuals(trained.control_model, x, t, context, hint)
    ref = reference_unet(trained.model.diffusion_model, x, t, context, residuals, only_mid=True)
    trained.only_mid_control = True
    try:
        out = trained.apply_model(x, t, cond(context, hint))
    finally:
        trained.only_mid_control = False
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_global_average_pooling_averages_each_residual(trained):
    x, t, context, hint = inputs()
    pooled = [r.mean(dim=(2, 3), keepdim=True)
              for r in reference_residuals(trained.control_model, x, t, context, hint)]
    ref = reference_unet(trained.model.diffusion_model, x, t, context, pooled)
    trained.global_average_pooling = True
    try:
        out = trained.apply_model(x, t, cond(context, hint))
    finally:
        trained.global_average_pooling = False
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_controlnet_takes_hint_channels_not_out_channels():
    params = dict(controlnet_config()["model"]["params"]["control_stage_config"]["params"], hint_channels=1)
    control = ControlNet(**params)
    assert control.input_hint_block[0].weight.shape[1] == 1
    with pytest.raises(TypeError):
        ControlNet(**params, out_channels=4)
