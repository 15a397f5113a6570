"""int8 dynamic quantization: the U-Net's Linear layers (but the embeddings') become quantized copies of the weights
they hold when attached, the output stays close, and removing it gives the float modules back."""
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from ldm.errors import UserError
from ldm.modules.speedups import Int8Linears, approximated
from ldm.modules.speedups.int8 import Int8Linear
from tiny_models import build_tiny_model


@pytest.fixture
def model():
    return build_tiny_model()


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g)


def linears(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}


def test_linears_are_quantized_and_given_back(model):
    unet = model.model.diffusion_model
    before = linears(unet)
    x, t, context = unet_inputs()
    with torch.no_grad():
        exact = unet(x, t, context=context)
        quantized = Int8Linears(unet).attach()
        during = linears(unet)
        out = unet(x, t, context=context)
        quantized.remove()
        after = unet(x, t, context=context)
    kept = {name for name in before if name.startswith(("time_embed", "label_emb"))}
    assert kept and quantized.count == 0
    assert {name for name, m in during.items() if isinstance(m, Int8Linear)} == set(before) - kept
    assert all(isinstance(during[name].quantized, DynamicQuantizedLinear) for name in set(before) - kept)
    assert all(type(during[name]) is nn.Linear for name in kept)
    assert all(linears(unet)[name] is m for name, m in before.items())
    assert torch.equal(after, exact)
    assert out.shape == exact.shape and not torch.equal(out, exact)
    assert (out - exact).abs().max() / exact.abs().max() < 0.05


def test_the_copy_holds_the_weights_as_they_are_when_attached(model):
    """A LoRA merged before quantizing is in the quantized layers; removing gives back the very same modules, so
    the LoRA's own removal afterwards restores the original weights."""
    unet = model.model.diffusion_model
    layer = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.weight += 0.5   # as a merged LoRA would
        shifted = layer(x)
        with approximated(model, int8=True):
            quantized = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
            assert isinstance(quantized, Int8Linear)
            torch.testing.assert_close(quantized(x), shifted, atol=0.05, rtol=0.05)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q is layer


def test_under_bfloat16_autocast_the_quantized_layers_take_and_give_its_dtype(model):
    unet = model.model.diffusion_model
    x, t, context = unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        exact = unet(x, t, context=context)
        layer = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
        with approximated(model, int8=True):
            quantized = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
            assert quantized(torch.ones(2, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16
            out = unet(x, t, context=context)
    assert out.dtype == exact.dtype and (out - exact).abs().max() / exact.abs().max() < 0.05


def test_refused_off_the_cpu(model):
    with pytest.raises(UserError, match="runs on the CPU only; the model is on meta"):
        Int8Linears(model.model.diffusion_model.to("meta"))
