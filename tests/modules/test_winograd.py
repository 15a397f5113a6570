import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.winograd import stop_winograd, transform_filter, use_winograd, winograd_conv3x3


def relative_error(reference, out):
    return ((reference - out).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("shape", [(1, 3, 5, 7, 9), (2, 8, 4, 4, 4), (2, 16, 24, 13, 32), (1, 32, 8, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_direct_convolution(shape, bias):
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    b = torch.randn(k, generator=gen) if bias else None
    reference = F.conv2d(x, weight, b, padding=1)
    out = winograd_conv3x3(x, transform_filter(weight), b)
    assert out.shape == reference.shape and out.is_contiguous()
    assert relative_error(reference, out) < 1e-5


def test_winograd_filter_transform_of_a_delta_is_identity_convolution():
    weight = torch.zeros(4, 4, 3, 3)
    weight[range(4), range(4), 1, 1] = 1.0
    x = torch.randn(1, 4, 10, 6)
    assert torch.allclose(winograd_conv3x3(x, transform_filter(weight)), x, atol=1e-5)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 1))


def test_use_winograd_switches_only_3x3_stride_1_convolutions_above_the_size():
    net = small_net()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        reference = net(x)
        assert use_winograd(net, min_channels=1, min_size=16) == 2
        assert torch.equal(net(x), reference)  # the first forward runs directly and plans the cache
        calls = []
        net[2].register_forward_hook(lambda *_: calls.append(net[2].winograd_cache is not None))
        out = net(x)
        assert calls == [True] and relative_error(reference, out) < 1e-5
        assert net[0].winograd_cache is not None and net[3].__dict__.get("winograd_cache") is None
        small = torch.randn(2, 4, 8, 8)   # below min_size: the plain convolution, bit for bit
        net[0].winograd_cache = net[2].winograd_cache = None
        assert torch.equal(net(small), small_net()(small))
        assert net[0].winograd_cache is None
    assert set(net.state_dict()) == set(small_net().state_dict())


def test_winograd_follows_in_place_weight_changes_and_stops():
    net = small_net()
    use_winograd(net, min_channels=1, min_size=1)
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        net(x), net(x)
        assert net[0].winograd_cache is not None
        net[0].weight.mul_(2.0)   # as a LoRA merge does
        changed = net(x)
        stop_winograd(net)
        assert relative_error(net(x), changed) < 1e-5
    assert "forward" not in vars(net[0]) and net[0].winograd_cache is None


def test_winograd_steps_aside_for_gradients_and_other_dtypes():
    net = small_net()
    use_winograd(net, min_channels=1, min_size=1)
    x = torch.randn(1, 4, 12, 12, requires_grad=True)
    net(x).sum().backward()   # the plain convolution: gradients flow to input and weights
    assert x.grad is not None and net[0].weight.grad is not None and net[0].winograd_cache is None
    with torch.no_grad():
        net.double()(x.detach().double())
    assert net[0].winograd_cache is None


def test_winograd_cache_stays_within_its_budget():
    net = small_net()   # transformed filters: 4 x (8*4*9 + 8*8*9) floats = 4608 + 9216 bytes
    use_winograd(net, min_channels=1, min_size=1, budget_bytes=10_000)
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        reference = small_net()(x)
        net(x)
        out = net(x)
    assert net[0].winograd_cache is not None and net[2].winograd_cache is None  # over budget: direct
    assert relative_error(reference, out) < 1e-5


def test_winograd_budget_goes_to_the_largest_feature_maps_first():
    torch.manual_seed(0)
    # the small filter runs at 4x4, the large one at 16x16: the large one saves more per cached byte
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Upsample(scale_factor=4), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        reference = net(x)
        use_winograd(net, min_channels=1, min_size=1, budget_bytes=4 * 16 * 16 * 9 * 4)
        net(x)
        assert not net[2].winograd_cached   # planning: nothing is cached during the first forward
        out = net(x)
    assert net[2].winograd_cached and not net[0].winograd_cached
    assert net[2].winograd_cache is not None and net[0].winograd_cache is None
    assert relative_error(reference, out) < 1e-5


def test_winograd_without_a_budget_needs_no_planning_forward():
    net = small_net()
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        reference = net(x)
        use_winograd(net, min_channels=1, min_size=1, budget_bytes=float("inf"))
        out = net(x)
    assert net[0].winograd_cache is not None and net[2].winograd_cache is not None
    assert relative_error(reference, out) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_winograd_in_bands_of_tile_rows_equals_one_pass(monkeypatch, bias):
    from ldm.modules import winograd
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 23, 10, generator=gen)   # 6 tile rows, the last one partly outside the map
    weight = torch.randn(5, 6, 3, 3, generator=gen)
    b = torch.randn(5, generator=gen) if bias else None
    whole = winograd_conv3x3(x, transform_filter(weight), b)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 36 * 2 * 3 * 6 * 4 * 4)   # bands of 4 tile rows: 4 + 2
    banded = winograd.winograd_conv3x3(x, transform_filter(weight), b)
    assert torch.equal(whole, banded)
    assert relative_error(F.conv2d(x, weight, b, padding=1), banded) < 1e-5


def test_winograd_leaves_narrow_convolutions_to_the_direct_kernel():
    net = small_net()   # 4 and 8 channels: below MIN_CHANNELS
    assert use_winograd(net, min_size=1) == 0
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        assert torch.equal(net(x), small_net()(x))
