"""The offline MiDaS DPT depth model: feature extraction, loading, input preparation."""
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.midas.api import MiDaSInference, midas_input, midas_input_size

# A DPT-Hybrid with the real ResNet-50 stem and a 4-block, 32-wide ViT (readouts after blocks 2, 3).
TINY_DPT = dict(features=16, hooks=[0, 1, 2, 3], embed_dim=32, depth=4, num_heads=2, img_size=64)


@pytest.fixture(scope="module")
def tiny_midas():
    torch.manual_seed(0)
    return MiDaSInference("dpt_hybrid", **TINY_DPT)


def timm_reference_features(encoder, x):
    """The four DPT features the way MiDaS takes them: forward hooks on the ResNet stages and ViT
    blocks while timm runs its own backbone and patch embedding."""
    vit, seen = encoder.model, {}
    handles = [vit.patch_embed.backbone.stages[i].register_forward_hook(
        lambda m, i_, out, i=i: seen.__setitem__(i, out)) for i in (0, 1)]
    handles += [vit.blocks[b].register_forward_hook(lambda m, i_, out, b=b: seen.__setitem__(f"b{b}", out))
                for b in encoder.hooks[2:]]
    try:
        tokens = vit.patch_embed(x)  # timm's HybridEmbed: backbone, then 1x1 projection, flattened
        tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        pos = vit.pos_embed  # the tiny model is built at the test size: no resizing needed
        tokens = tokens + pos
        for block in vit.blocks:
            tokens = block(tokens)
    finally:
        for h in handles:
            h.remove()
    grid = (x.shape[2] // 16, x.shape[3] // 16)
    out = [seen[0], seen[1]]
    for level, b in zip((2, 3), encoder.hooks[2:]):
        post = getattr(encoder, f"act_postprocess{level + 1}")
        t = seen[f"b{b}"]
        readout = t[:, :1].expand_as(t[:, 1:])
        maps = post[0].project(torch.cat((t[:, 1:], readout), -1)).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        for conv in list(post)[3:]:
            maps = conv(maps)
        out.append(maps)
    return out


def test_features_match_timm_forward_with_hooks(tiny_midas):
    encoder = tiny_midas.model.pretrained
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(x)
        ref = timm_reference_features(encoder, x)
    assert [tuple(t.shape) for t in ours] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 768, 4, 4), (2, 768, 2, 2)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_resized_position_embedding_is_identity_at_build_size(tiny_midas):
    encoder = tiny_midas.model.pretrained
    torch.testing.assert_close(encoder.resized_pos_embed((4, 4)), encoder.model.pos_embed)
    assert encoder.resized_pos_embed((4, 6)).shape == (1, 1 + 24, 32)


def test_depth_needs_weights_and_loading_provides_them(tiny_midas):
    x = torch.randn(1, 3, 64, 96)
    fresh = MiDaSInference("dpt_hybrid", **TINY_DPT)
    with pytest.raises(UserError, match="no weights"):
        fresh(x)
    fresh.load_state_dict(tiny_midas.state_dict())
    assert fresh.has_weights
    tiny_midas.has_weights = True
    depth = fresh(x)
    assert depth.shape == (1, 1, 64, 96)
    assert (depth >= 0).all()  # non-negative head
    torch.testing.assert_close(depth, tiny_midas(x))


def test_stays_in_eval_mode(tiny_midas):
    tiny_midas.train()
    assert not tiny_midas.training and not tiny_midas.model.training


@pytest.mark.parametrize("hw,expected", [((512, 512), (384, 384)), ((512, 768), (384, 576)),
                                          ((300, 1000), (384, 1280)), ((768, 512), (576, 384))])
def test_input_size_rule(hw, expected):
    # "minimal": the scale closest to 1 (of 384/H and 384/W) for both sides, rounded to multiples of 32
    assert midas_input_size(*hw, "dpt_hybrid") == expected


def test_input_is_resized_image_in_minus_one_one():
    image = torch.rand(2, 3, 512, 512) * 2 - 1
    x = midas_input(image, "dpt_hybrid")
    assert x.shape == (2, 3, 384, 384) and x.dtype == torch.float32
    # (x01 - 0.5) / 0.5 is the image itself: a constant image stays constant
    flat = midas_input(torch.full((1, 3, 64, 64), 0.25), "dpt_hybrid")
    torch.testing.assert_close(flat, torch.full_like(flat, 0.25))


@pytest.mark.parametrize("name", ["dpt_giant", "MiDaS_small"])
def test_unknown_model_types(name):
    with pytest.raises(UserError, match=name):
        MiDaSInference(name)


def test_v21_small_has_the_release_layout_and_runs():
    torch.manual_seed(0)
    midas = MiDaSInference("midas_v21_small")
    shapes = {k: tuple(v.shape) for k, v in midas.model.state_dict().items()}
    # names and shapes of midas_v21_small-70d6b9c8.pt: EfficientNet-Lite3 stem and blocks under
    # layer1 (index 2 is the stem activation), decoder widths 512/256/128/64
    assert shapes["pretrained.layer1.0.weight"] == (32, 3, 3, 3)
    assert shapes["pretrained.layer1.1.running_var"] == (32,)
    assert shapes["pretrained.layer1.3.0.conv_dw.weight"] == (32, 1, 3, 3)
    assert shapes["pretrained.layer4.1.0.conv_pwl.weight"] == (384, 1392, 1, 1)
    assert shapes["scratch.layer1_rn.weight"] == (64, 32, 3, 3)
    assert shapes["scratch.layer4_rn.weight"] == (512, 384, 3, 3)
    assert shapes["scratch.refinenet4.out_conv.weight"] == (256, 512, 1, 1)
    assert shapes["scratch.refinenet1.out_conv.weight"] == (64, 64, 1, 1)
    assert shapes["scratch.output_conv.4.weight"] == (1, 32, 1, 1)
    midas.has_weights = True
    depth = midas(torch.randn(1, 3, 64, 96))
    assert depth.shape == (1, 1, 64, 96) and depth.min() >= 0


def test_v21_has_the_release_layout():
    with torch.device("meta"):
        midas = MiDaSInference("midas_v21")
    shapes = {k: tuple(v.shape) for k, v in midas.model.state_dict().items()}
    # midas_v21-f6b98070.pt: ResNeXt-101 32x8d (stem, pool and layer1 in pretrained.layer1), width 256
    assert shapes["pretrained.layer1.0.weight"] == (64, 3, 7, 7)
    assert shapes["pretrained.layer1.4.0.conv2.weight"] == (256, 8, 3, 3)
    assert shapes["pretrained.layer3.22.conv3.weight"] == (1024, 1024, 1, 1)
    assert shapes["scratch.layer4_rn.weight"] == (256, 2048, 3, 3)
    assert not any(k.startswith("scratch.refinenet1.out_conv") for k in shapes)
    assert shapes["scratch.output_conv.0.weight"] == (128, 256, 3, 3)


def test_v21_residual_units_add_back_the_rectified_input():
    from ldm.modules.midas.midas_net import ResidualConvUnitV21
    unit = ResidualConvUnitV21(2)
    for conv in (unit.conv1, unit.conv2):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    x = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    torch.testing.assert_close(unit(x), x.clamp(min=0))  # the release's in-place ReLU on the skip


@pytest.mark.parametrize("model_type,size,expected", [
    ("midas_v21_small", (512, 768), (160, 256)),    # fits inside 256x256
    ("midas_v21_small", (512, 512), (256, 256)),
    ("midas_v21", (300, 1000), (128, 384)),          # 115.2 rounds to 128
    ("dpt_hybrid", (512, 768), (384, 576)),          # the scale closer to 1 (0.75) for both sides
])
def test_input_sizes_follow_each_release_rule(model_type, size, expected):
    assert midas_input_size(*size, model_type) == expected


def test_v21_input_uses_imagenet_normalisation():
    x = midas_input(torch.zeros(1, 3, 64, 64), "midas_v21_small")  # mid-gray
    torch.testing.assert_close(x[0, :, 0, 0], (0.5 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))


def test_dpt_large_reassembles_four_vit_levels():
    torch.manual_seed(0)
    midas = MiDaSInference("dpt_large", **TINY_DPT)
    midas.has_weights = True
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = midas.model.pretrained(x)
    # 4x and 2x up, same, 2x down from the 4x6 patch grid
    assert [tuple(t.shape) for t in maps] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 1024, 2, 3)]
    assert midas(x).shape == (1, 1, 64, 96)
