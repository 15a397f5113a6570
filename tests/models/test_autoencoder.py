import torch

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.diffusionmodules.model import AttnBlock, make_attn

DD = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def build():
    torch.manual_seed(0)
    return AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=4).eval()


def test_encode_decode_shapes_and_posterior():
    vae = build()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (2, 4, 4, 4)
        torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
        assert torch.equal(post.mode(), post.mean)
        dec = vae.decode(post.mode())
    assert dec.shape == x.shape


def test_posterior_sample_draws_from_the_global_cpu_rng():
    vae = build()
    with torch.no_grad():
        post = vae.encode(torch.zeros(1, 3, 16, 16))
        torch.manual_seed(3)
        z = post.sample()
        torch.manual_seed(3)
        expected = post.mean + post.std * torch.randn(post.mean.shape)
    torch.testing.assert_close(z, expected)


def test_vae_attention_matches_single_head_softmax():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(1, 32, 3, 3)
    h = block.norm(x)
    q, k, v = (m(h).reshape(1, 32, 9) for m in (block.q, block.k, block.v))
    w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # [1, 9(query), 9(key)]
    ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(1, 32, 3, 3))
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_vae_attention_hands_sdpa_contiguous_inputs_in_either_layout(monkeypatch):
    """A transposed view sends CPU SDPA to its math path, which holds the HW x HW weights (2.3 GB more
    for a 1024px decode); NCHW activations must be copied, channels_last ones are already in order."""
    import ldm.modules.diffusionmodules.model as vae_model
    seen = []
    attention = vae_model.attention
    monkeypatch.setattr(vae_model, "attention",
                        lambda q, k, v, **kw: seen.append(all(t.is_contiguous() for t in (q, k, v))) or attention(q, k, v, **kw))
    block = AttnBlock(32)
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        out = block(x)
        out_cl = block(x.contiguous(memory_format=torch.channels_last))
    assert seen == [True, True]
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-5)


def test_xformers_attn_type_falls_back_without_xformers():
    assert isinstance(make_attn(32, "vanilla-xformers"), AttnBlock)


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage()
    assert stage.encode(x) is x and stage.decode(x) is x
