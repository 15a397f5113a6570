"""The guided model call: classifier-free guidance and CFG rescale (Lin et al. 2023, eq. 15-16)."""
import pytest
import torch

from ldm.errors import UserError
from ldm.models.diffusion.guidance import GuidedModel


class AffineModel:
    """apply_model(x, t, c) = c * x + c**2, per sample: outputs whose scale and mean depend on c."""
    parameterization = "v"

    def apply_model(self, x, t, cond):
        c = cond.reshape(-1, *((1,) * (x.ndim - 1)))
        return c * x + c ** 2


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 500])
    return x, t, torch.tensor([2.0, -3.0]), torch.tensor([0.5, 0.25])


def per_sample_std(v):
    return v.flatten(1).std(dim=1)


def test_phi_zero_is_plain_cfg():
    x, t, cond, uncond = inputs()
    out = GuidedModel(AffineModel(), cond, uncond, scale=7.5, guidance_rescale=0.0)(x, t)
    c, u = AffineModel().apply_model(x, t, cond), AffineModel().apply_model(x, t, uncond)
    torch.testing.assert_close(out, u + 7.5 * (c - u), rtol=0, atol=0)


def test_phi_one_matches_the_conditional_std_exactly():
    x, t, cond, uncond = inputs()
    out = GuidedModel(AffineModel(), cond, uncond, scale=7.5, guidance_rescale=1.0)(x, t)
    c, u = AffineModel().apply_model(x, t, cond), AffineModel().apply_model(x, t, uncond)
    plain = u + 7.5 * (c - u)
    assert (per_sample_std(plain) / per_sample_std(c)).min() > 2  # guidance inflated the scale ...
    torch.testing.assert_close(per_sample_std(out), per_sample_std(c))  # ... and the rescale undid it
    # the rescale only scales each sample: same direction as plain CFG
    ratio = out / plain
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio))


def test_phi_mixes_the_rescaled_and_the_plain_output():
    """eq. 16: phi * x_rescaled + (1 - phi) * x_cfg, with x_rescaled = x_cfg * std(x_pos) / std(x_cfg)."""
    x, t, cond, uncond = inputs()
    c, u = AffineModel().apply_model(x, t, cond), AffineModel().apply_model(x, t, uncond)
    plain = u + 3.0 * (c - u)
    factor = (per_sample_std(c) / per_sample_std(plain)).reshape(-1, 1, 1, 1)
    out = GuidedModel(AffineModel(), cond, uncond, scale=3.0, guidance_rescale=0.7)(x, t)
    torch.testing.assert_close(out, 0.7 * plain * factor + 0.3 * plain)


def test_rescale_is_a_no_op_without_guidance():
    x, t, cond, uncond = inputs()
    for uc, scale in ((uncond, 1.0), (None, 7.5)):
        out = GuidedModel(AffineModel(), cond, uc, scale=scale, guidance_rescale=0.7)(x, t)
        torch.testing.assert_close(out, AffineModel().apply_model(x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("phi", [-0.1, 1.5, float("nan")])
def test_phi_outside_zero_one_is_refused(phi):
    _, _, cond, uncond = inputs()
    with pytest.raises(UserError, match="guidance_rescale must be between 0 and 1"):
        GuidedModel(AffineModel(), cond, uncond, scale=7.5, guidance_rescale=phi)
