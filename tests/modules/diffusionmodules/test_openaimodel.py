"""U-Net forward shapes across the configuration space the official YAMLs use."""
import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel

BASE = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
            attention_resolutions=[2, 1], channel_mult=[1, 2], use_checkpoint=False, legacy=False)


@pytest.mark.parametrize("extra", [
    dict(num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=16),
    dict(num_heads=2, use_spatial_transformer=True, context_dim=16),  # SD 1.x: conv proj_in/out
    dict(num_heads=2, use_spatial_transformer=True, context_dim=16, transformer_depth=2, legacy=True),
    dict(num_heads=4),  # ADM self-attention blocks, no text
    dict(num_head_channels=16, use_new_attention_order=True, use_scale_shift_norm=True, resblock_updown=True),
    dict(num_heads=2, num_classes=10),
    dict(num_heads=2, num_classes="sequential", adm_in_channels=12),
    dict(num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=16,
         disable_self_attentions=[True, False], num_attention_blocks=[1, 0], num_res_blocks=[1, 2]),
])
def test_forward_shapes(extra):
    torch.manual_seed(0)
    model = UNetModel(**{**BASE, **extra}).eval()
    x = torch.randn(2, 4, 8, 8)
    kwargs = {}
    if extra.get("context_dim"):
        kwargs["context"] = torch.randn(2, 5, 16)
    if extra.get("num_classes") == 10:
        kwargs["y"] = torch.tensor([1, 7])
    elif extra.get("num_classes") == "sequential":
        kwargs["y"] = torch.randn(2, 12)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 500]), **kwargs)
        out_float_t = model(x, torch.tensor([3.5, 500.25]), **kwargs)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out_float_t.shape == x.shape


def test_class_conditional_requires_labels():
    model = UNetModel(**{**BASE, "num_heads": 2, "num_classes": 10})
    with pytest.raises(AssertionError, match="y"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]))


def test_bf16_weights_compute_in_bf16_and_return_input_dtype():
    torch.manual_seed(0)
    model = UNetModel(**BASE, num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True,
                      context_dim=16).eval()
    for p in model.parameters():  # the zero-initialised output conv would hide differences
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = model(x, t, context=ctx)
        out = model.to(torch.bfloat16)(x, t, context=ctx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    kw = dict(**BASE, num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True,
              context_dim=16)
    plain = UNetModel(**kw).train()
    ckpt = UNetModel(**{**kw, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 16)
    for m in (plain, ckpt):
        m(x, t, context=ctx).pow(2).mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
