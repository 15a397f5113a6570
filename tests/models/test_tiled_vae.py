"""Tiled VAE decode and encode (ldm.models.tiled_vae) on a small random-weight SD-layout VAE."""
import math

import pytest
import torch

from ldm.errors import UserError
from ldm.models import tiled_vae
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.tiled_vae import Tiling, blend_weights, tile_spans

# the SD VAE's layout (4 resolutions, f = 8, middle attention) at width 32
DD = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 4, 4],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
# Seams of this random-weight VAE with tiles of 12-16 latent pixels, measured: 31.1 dB (192 px image,
# 128 px tiles, whole-image GroupNorm statistics), 32.9 dB (the same, per-tile statistics), 27.6 dB
# (104x168 px, 96 px tiles). Tiles this small, and random weights, make tiles differ far more than
# 512 px tiles of a trained VAE do (bench/README.md), hence the low bound.
SEAM_PSNR_DB = 24.0


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=4).eval()


def psnr(a, b):
    a, b = ((a + 1) / 2).clamp(0, 1), ((b + 1) / 2).clamp(0, 1)
    return 10 * math.log10(1 / (a - b).pow(2).mean().item())


@pytest.mark.parametrize("size, tile, overlap", [(128, 64, 16), (65, 64, 16), (200, 64, 16), (10, 4, 1),
                                                 (13, 8, 4), (64, 64, 16)])
def test_tiles_cover_evenly_overlap_enough_and_weights_sum_to_one(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    lengths = {end - start for start, end in spans}
    assert len(lengths) == 1 and lengths.pop() <= tile
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))
    total = torch.zeros(size * 8)
    for (start, end), weight in zip(spans, blend_weights(spans, 8)):
        total[start * 8:end * 8] += weight
    torch.testing.assert_close(total, torch.ones_like(total))


def test_weights_ramp_across_the_overlap_and_are_one_away_from_neighbours():
    spans = tile_spans(20, 12, 4)
    first, second = blend_weights(spans, 1)
    assert spans == [(0, 12), (8, 20)]
    assert first[:8].eq(1).all() and second[4:].eq(1).all()
    torch.testing.assert_close(first[8:], torch.tensor([0.875, 0.625, 0.375, 0.125]))


def test_one_tile_is_exactly_the_untiled_decode_and_encode(vae):
    z = torch.randn(1, 4, 8, 8)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiled_vae.tiled_decode(vae, z, Tiling(64, 32)), vae.decode(z))
        assert torch.equal(tiled_vae.tiled_encode(vae, x, Tiling(64, 32)).mean, vae.encode(x).mean)
        # "auto" leaves images up to 768x768 untiled
        assert torch.equal(tiled_vae.decode(vae, z, "auto", Tiling(32, 16)), vae.decode(z))


@pytest.mark.parametrize("image_norms", [True, False])
def test_seams_stay_above_the_psnr_bound(vae, image_norms):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiled = tiled_vae.tiled_decode(vae, z, Tiling(128, 64, image_norms))
        untiled = vae.decode(z)
    assert tiled.shape == untiled.shape
    assert psnr(tiled, untiled) > SEAM_PSNR_DB


def test_preview_statistics_take_one_shrunk_run_instead_of_a_pass_over_the_tiles(vae):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    sizes = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, args, out: sizes.append(tuple(out.shape[-2:])))
    try:
        with torch.no_grad():
            preview = tiled_vae.tiled_decode(vae, z, Tiling(128, 64, preview_norms=True))
            untiled = vae.decode(z)
    finally:
        hook.remove()
    # 192 px in tiles of 128: a preview shrunk 2x to 96 px, then the 2 x 2 tiles, then the untiled decode
    assert sizes == [(96, 96)] + [(128, 128)] * 4 + [(192, 192)]
    # measured 24.9 dB: a random latent is white noise, the worst case for statistics of a shrunk copy
    # (the shipped VAE on shape images: 31.7 dB, bench/README.md)
    assert psnr(preview, untiled) > SEAM_PSNR_DB
    assert not any("forward" in vars(m) for m in vae.modules())
    x = torch.rand(1, 3, 136, 200, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        encoded = tiled_vae.tiled_encode(vae, x, Tiling(96, 48, preview_norms=True)).mean
        reference = vae.encode(x).mean
    assert encoded.shape == reference.shape
    assert (encoded - reference).pow(2).mean().sqrt() / reference.std() < 0.35     # measured 0.27


def test_latents_that_are_not_multiples_of_the_tile(vae):
    z = torch.randn(2, 4, 13, 21, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiled = tiled_vae.tiled_decode(vae, z, Tiling(96, 48))     # 2 x 3 tiles of 10 x 11
        untiled = vae.decode(z)
    assert tiled.shape == untiled.shape == (2, 3, 104, 168)
    assert torch.isfinite(tiled).all() and psnr(tiled, untiled) > SEAM_PSNR_DB


def test_tiled_encode_blends_the_posterior(vae):
    x = torch.rand(1, 3, 136, 200, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        tiled = tiled_vae.tiled_encode(vae, x, Tiling(96, 48))
        untiled = vae.encode(x)
    assert tiled.mean.shape == untiled.mean.shape == (1, 4, 17, 25)
    rel = (tiled.mean - untiled.mean).pow(2).mean().sqrt() / untiled.mean.std()
    assert rel < 0.25 and torch.isfinite(tiled.std).all()     # measured 0.14


def test_image_norms_restore_every_groupnorm(vae):
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        before = vae.decode(z)
        tiled_vae.tiled_decode(vae, z, Tiling(64, 32, image_norms=True))
        assert torch.equal(vae.decode(z), before)
    assert not any("forward" in vars(m) for m in vae.modules())


def test_image_norms_with_exact_statistics_reproduce_the_untiled_decode(vae):
    # what the normalisation does with the whole image's own statistics: the untiled result
    z = torch.randn(1, 4, 16, 16)
    decoder = vae.decoder
    with torch.no_grad():
        features = decoder.to_features(vae.post_quant_conv(z))
        norms = tiled_vae.ImageGroupNorms(decoder)
        with norms.gathering(torch.ones(128, 128)):
            untiled = decoder.from_features(features)
        with norms.applying():
            again = decoder.from_features(features)
    torch.testing.assert_close(again, untiled, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode, size, tiles", [("auto", 768, False), ("auto", 776, True), ("on", 64, True),
                                               ("off", 4096, False)])
def test_modes(mode, size, tiles):
    assert tiled_vae.tiles_image(mode, size, size) is tiles


def test_bad_mode_and_tiling_are_user_errors():
    with pytest.raises(UserError, match="VAE tiling 'sometimes' is unknown; use auto, on, off"):
        tiled_vae.check_mode("sometimes")
    with pytest.raises(UserError, match="0 <= overlap < tile"):
        Tiling(64, 64)
    with pytest.raises(UserError, match="preview_norms .* needs image_norms"):
        Tiling(64, 32, image_norms=False, preview_norms=True)


def test_channels_last_decode_and_encode_match_and_return_the_usual_layout(vae):
    z = torch.randn(1, 4, 8, 8)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        decoded = tiled_vae.decode(vae, z, channels_last=True)
        posterior = tiled_vae.encode(vae, x, channels_last=True)
        torch.testing.assert_close(decoded, vae.decode(z), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(posterior.mean, vae.encode(x).mean, atol=1e-4, rtol=1e-4)
    assert decoded.is_contiguous() and posterior.parameters.is_contiguous()


def test_latent_diffusion_uses_the_settings_and_restores_them(tiny_model, monkeypatch):
    seen = []
    monkeypatch.setattr(tiled_vae, "tiled_decode",
                        lambda vae, z, tiling=None: seen.append((z.shape, tiling.preview_norms)) or vae.decode(z))
    z = torch.randn(1, 4, 8, 8)
    assert (tiny_model.first_stage_tiling, tiny_model.first_stage_channels_last) == ("off", False)
    with tiled_vae.first_stage_settings(tiny_model, "on", channels_last=True):
        assert tiny_model.first_stage_channels_last
        tiny_model.decode_first_stage(z)
    with tiled_vae.first_stage_settings(tiny_model, "on", channels_last=False, stats="preview"):
        tiny_model.decode_first_stage(z)
    assert seen == [(z.shape, False), (z.shape, True)]
    assert (tiny_model.first_stage_tiling, tiny_model.first_stage_tiling_stats,
            tiny_model.first_stage_channels_last) == ("off", "image", False)
    tiny_model.decode_first_stage(z)
    assert len(seen) == 2
