import pytest
import torch

from ldm.errors import UserError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.contperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS


def _inputs(seed=0, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    rec = (x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    posterior = DiagonalGaussianDistribution(torch.randn(b, 8, size // 4, size // 4, generator=g))
    return x, rec, posterior


def test_official_import_paths():
    from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator as direct
    assert direct is LPIPSWithDiscriminator


def test_perceptual_weight_zero_builds_no_vgg_and_gives_finite_losses():
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, kl_weight=1e-6)
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())
    x, rec, posterior = _inputs()
    g_loss, log = loss(x, rec, posterior, 0, global_step=0, last_layer=rec, split="train")
    d_loss, dlog = loss(x, rec, posterior, 1, global_step=0, split="train")
    assert torch.isfinite(g_loss)
    assert log["train/disc_factor"] == 0.0  # before disc_start
    assert d_loss == 0.0 and "train/disc_loss" in dlog
    # nll = sum|x - rec| / B with logvar 0; KL weighted 1e-6; GAN term off before disc_start
    expected = (x - rec).abs().sum() / 2 + 1e-6 * posterior.kl().sum() / 2
    torch.testing.assert_close(g_loss, expected)


def test_perceptual_weight_without_weights_is_a_user_error():
    with pytest.raises(UserError, match="perceptual_weights_path"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)


def test_generator_loss_after_disc_start_uses_adaptive_weight():
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start=5, perceptual_weight=0.0, disc_weight=0.5)
    x, rec, posterior = _inputs()
    last_layer = torch.nn.Parameter(torch.ones(()))
    scaled = rec * last_layer  # gradients w.r.t. last_layer exist for both terms
    total, log = loss(x, scaled, posterior, 0, global_step=5, last_layer=last_layer)
    nll = (x - scaled).abs().sum() / 2
    g = -loss.discriminator(scaled).mean()
    gn = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0].norm()
    d_weight = 0.5 * torch.clamp(gn / (gg + 1e-4), 0, 1e4)
    torch.testing.assert_close(log["train/d_weight"], d_weight.detach())
    assert log["train/disc_factor"] == 1.0
    torch.testing.assert_close(total, nll + posterior.kl().sum() / 2 + d_weight * g)
    assert loss(x, scaled, posterior, 1, global_step=5)[0] > 0


def test_validation_mode_gives_zero_adaptive_weight():
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0).eval()
    x, rec, posterior = _inputs()
    with torch.no_grad():
        _, log = loss(x, rec, posterior, 0, global_step=100, last_layer=rec, split="val")
    assert log["val/d_weight"] == 0.0 and "val/rec_loss" in log


def test_gan_losses_and_adopt_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    softplus = torch.nn.functional.softplus
    expected = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert adopt_weight(1.0, 9, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0
    with pytest.raises(UserError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_loss="wgan")


def test_discriminator_layout_and_patch_output():
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # taming layout: conv, lrelu, then (conv, norm, lrelu) x 3, conv
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in shapes
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.3.running_mean"] == (128,)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_actnorm_discriminator_initialises_from_data():
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
    assert "main.2.bias" in d.state_dict()  # ActNorm has no shift of its own: convs keep a bias
    norm = d.main[3]
    d(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert norm.initialized.item() == 1
    assert not torch.equal(norm.scale, torch.ones_like(norm.scale))


def _random_lpips_file(tmp_path, layout):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    source = LPIPS()
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(0.0, 0.1)  # non-negative heads, like the trained LPIPS
    sd = source.state_dict()
    if layout == "torchvision":
        renamed = {}
        for k, v in sd.items():
            if k.startswith("net.slice"):
                renamed["features." + k.split(".", 2)[2]] = v
            elif k.startswith("lin"):
                renamed[k] = v
        sd = renamed
    else:
        sd = {"loss.perceptual_loss." + k: v for k, v in sd.items()}
    path = tmp_path / f"lpips-{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return source, path


@pytest.mark.parametrize("layout", ["torchvision", "checkpoint"])
def test_perceptual_weights_path_loads_lpips(tmp_path, layout):
    source, path = _random_lpips_file(tmp_path, layout)
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, perceptual_weights_path=str(path))
    lpips = loss.perceptual_loss
    for key, value in source.state_dict().items():
        assert torch.equal(lpips.state_dict()[key], value), key
    assert not any(p.requires_grad for p in lpips.parameters())
    loss.train()
    assert not lpips.training  # frozen metric: its dropout never switches on
    x, rec, _ = _inputs(size=16)
    assert lpips(x, x).abs().max() < 1e-6
    d = lpips(x, rec)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    torch.testing.assert_close(lpips(x, rec), d)  # deterministic


def test_perceptual_weights_path_missing_tensors(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "partial.safetensors"
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(path))
    with pytest.raises(UserError, match="lacks"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, perceptual_weights_path=str(path))
