"""Hypernetworks on the tiny model's attention layers: an attention layer with one attached equals attention written
out by hand over keys from ``to_k(hyper_k(context))`` and values from ``to_v(hyper_v(context))``; the U-Net output
changes, and is bit for bit the model's own after removal and at multiplier 0; two chain in order; a hypernetwork
for widths the model has no attention layer of is refused."""
import copy

import pytest
import torch
from a1111_hypernetworks import TINY_WIDTHS, save_a1111_hypernetwork
from tiny_models import build_tiny_model

from ldm.errors import UserError
from ldm.modules.attention import CrossAttention
from ldm.modules.hypernetworks import (
    HypernetworkHooks,
    HypernetworkUse,
    attention_layers,
    hypernetwork_use,
    read_hypernetwork_file,
)


@pytest.fixture(scope="module")
def _tiny():
    return build_tiny_model()


@pytest.fixture
def model(_tiny):
    return copy.deepcopy(_tiny)


@pytest.fixture
def files(tmp_path):
    """Two hypernetworks for the tiny model's widths, with their MLPs written out by hand."""
    mlps_a = save_a1111_hypernetwork(tmp_path / "a.pt", "relu_norm", seed=1)
    mlps_b = save_a1111_hypernetwork(tmp_path / "b.pt", "deep_mish", seed=2)
    return {"a": (read_hypernetwork_file(tmp_path / "a.pt"), mlps_a),
            "b": (read_hypernetwork_file(tmp_path / "b.pt"), mlps_b)}


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g)


def unet_output(model):
    x, t, context = unet_inputs()
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context)


def attention_by_hand(layer, x, context_k, context_v):
    """Softmax attention of ``layer``'s heads, from its projections (no code of the attention module)."""
    q, k, v = layer.to_q(x), layer.to_k(context_k), layer.to_v(context_v)
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, t.shape[1], layer.heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return layer.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


def test_the_tiny_model_reads_the_widths_the_files_are_written_for(model):
    assert sorted({width for _, width in attention_layers(model)}) == list(TINY_WIDTHS)
    assert all(layer.context_hook is None for layer, _ in attention_layers(model))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_an_attention_layer_uses_the_hypernetwork_of_its_context_width(model, files, backend, which):
    hypernetwork, mlps = files["a"]
    block = model.model.diffusion_model.output_blocks[1][1].transformer_blocks[0]  # the 64-channel level
    layer = getattr(block, which)
    layer.backend = backend
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 64, generator=g)
    context = None if which == "attn1" else torch.randn(2, 77, 32, generator=g)
    context_in = x if context is None else context
    mlp_k, mlp_v = mlps[context_in.shape[-1]]
    with torch.no_grad(), hypernetwork_use(model, [(hypernetwork, 0.7)]):
        hooked = layer(x, context=context)
        expected = attention_by_hand(layer, x, context_in + 0.7 * mlp_k(context_in),
                                     context_in + 0.7 * mlp_v(context_in))
    torch.testing.assert_close(hooked, expected, rtol=1e-4, atol=1e-5)


def test_applying_changes_the_unet_and_removing_restores_it_bit_for_bit(model, files):
    base = unet_output(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = HypernetworkHooks(model)
    hooks.apply([HypernetworkUse(files["a"][0], 1.0)])
    changed = unet_output(model)
    assert (changed - base).abs().max() > 1e-2
    assert model.state_dict().keys() == state.keys()  # a hook adds no parameter or buffer
    hooks.remove()
    assert torch.equal(unet_output(model), base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(layer.context_hook is None for layer, _ in attention_layers(model))


def test_multiplier_zero_is_exactly_no_hypernetwork(model, files):
    base = unet_output(model)
    with hypernetwork_use(model, [(files["a"][0], 0.0)]):
        assert all(layer.context_hook is None for layer, _ in attention_layers(model))
        assert torch.equal(unet_output(model), base)


def test_two_chain_in_the_order_given(model, files):
    (a, mlps_a), (b, mlps_b) = files["a"], files["b"]
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        once_a = context + 0.5 * mlps_a[32][0](context)
        keys = once_a + 1.5 * mlps_b[32][0](once_a)
        once_a_v = context + 0.5 * mlps_a[32][1](context)
        values = once_a_v + 1.5 * mlps_b[32][1](once_a_v)
        with hypernetwork_use(model, [(a, 0.5), (b, 1.5)]):
            torch.testing.assert_close(layer(x, context=context), attention_by_hand(layer, x, keys, values),
                                       rtol=1e-4, atol=1e-5)
            a_then_b = unet_output(model)
        with hypernetwork_use(model, [(b, 1.5), (a, 0.5)]):
            assert not torch.allclose(unet_output(model), a_then_b)


def test_layers_of_a_width_the_file_lacks_are_left_alone(model, tmp_path):
    save_a1111_hypernetwork(tmp_path / "only64.pt", widths=(64, 1280))
    hypernetwork = read_hypernetwork_file(tmp_path / "only64.pt")
    with hypernetwork_use(model, [(hypernetwork, 1.0)]):
        hooked = {width for layer, width in attention_layers(model) if layer.context_hook is not None}
        assert hooked == {64}


def test_a_hypernetwork_for_widths_no_layer_reads_is_refused(model, tmp_path):
    save_a1111_hypernetwork(tmp_path / "sd1.pt", widths=(320, 640, 768, 1280))
    hypernetwork = read_hypernetwork_file(tmp_path / "sd1.pt")
    with pytest.raises(UserError, match=r"has layers for context widths 320, 640, 768, 1280, but this model's "
                                        r"attention layers read widths 32, 64; it was made for another model"):
        HypernetworkHooks(model).apply([HypernetworkUse(hypernetwork)])
    assert all(layer.context_hook is None for layer, _ in attention_layers(model))


def test_a_new_set_replaces_the_old_and_an_error_inside_the_block_still_removes(model, files):
    base = unet_output(model)
    hooks = HypernetworkHooks(model)
    hooks.apply([(files["a"][0], 1.0)])
    hooks.apply([(files["b"][0], 1.0)])
    only_b = unet_output(model)
    hooks.remove()
    with hypernetwork_use(model, [(files["b"][0], 1.0)]):
        assert torch.equal(unet_output(model), only_b)
    with pytest.raises(RuntimeError, match="inside"):
        with hypernetwork_use(model, [(files["a"][0], 1.0)]):
            raise RuntimeError("inside")
    assert torch.equal(unet_output(model), base)


def test_a_second_caller_cannot_stack_on_hooks_it_does_not_own(model, files):
    with hypernetwork_use(model, [(files["a"][0], 1.0)]):
        with pytest.raises(UserError, match="already have hypernetworks attached"):
            HypernetworkHooks(model).apply([(files["b"][0], 1.0)])


def test_a_half_precision_context_is_computed_in_float32_and_cast_back(model, files):
    layer = next(layer for layer, width in attention_layers(model) if width == 32 and isinstance(layer, CrossAttention))
    with hypernetwork_use(model, [(files["a"][0], 1.0)]):
        keys, values = layer.context_hook(torch.randn(1, 4, 32).half())
    assert keys.dtype == values.dtype == torch.float16
