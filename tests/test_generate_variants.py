"""ldm.generate_variants on tiny random-weight models: inpainting (blend and 9-channel), depth,
tiled upscaling and unCLIP variations, plus the image/mask/tile helpers they rest on."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserError
from ldm import generate as generation
from ldm import generate_variants as gv
from tiny_models import depth_config, inpaint_config, unclip_config, upscale_config

STEPS = dict(steps=2, progress=False)


def rgb(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def box_mask(w, h, box):
    mask = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


# ------------------------------------------------------------------------------------------- helpers
def test_to_mask_treats_transparency_as_keep():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255            # white everywhere ...
    rgba[:2, :, 3] = 255           # ... but opaque only in the top half
    mask = np.asarray(gv.to_mask(Image.fromarray(rgba)))
    assert (mask[:2] == 255).all() and (mask[2:] == 0).all()
    one_bit = Image.fromarray(np.eye(4, dtype=bool))
    assert np.array_equal(np.asarray(gv.to_mask(one_bit)), np.eye(4) * 255)


def test_pad_to_multiple_repeats_edges():
    image = rgb(10, 6)
    padded = gv.pad_to_multiple(image, 8)
    assert padded.size == (16, 8)
    a, p = np.asarray(image), np.asarray(padded)
    assert np.array_equal(p[:6, :10], a)
    assert np.array_equal(p[:6, 15], a[:, 9]) and np.array_equal(p[7, :10], a[5])
    assert gv.pad_to_multiple(image, 2) is image


def test_outpaint_canvas_rounds_up_and_masks_the_new_area(caplog):
    image = rgb(16, 8)
    inner = box_mask(16, 8, (0, 0, 4, 4))
    with caplog.at_level(logging.WARNING, logger="ldm"):
        canvas, mask = gv.outpaint_canvas(image, inner, left=3, right=0, top=8, bottom=1)
    assert "rounded up to multiples of 8: 8,0,8,8" in caplog.text
    assert canvas.size == mask.size == (16 + 8, 8 + 16)
    c, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[8:16, 8:24], np.asarray(image))
    assert np.array_equal(c[8:16, 0], np.asarray(image)[:, 0])    # new columns repeat the edge
    assert (m[:8] == 255).all() and (m[16:] == 255).all() and (m[:, :8] == 255).all()
    assert np.array_equal(m[8:16, 8:24], np.asarray(inner))
    with pytest.raises(UserError, match="0 or more"):
        gv.outpaint_canvas(image, None, left=-8)


@pytest.mark.parametrize("size, tile, overlap", [(10, 16, 4), (16, 16, 4), (17, 16, 4), (100, 32, 8), (64, 24, 0)])
def test_tiles_cover_the_image_with_the_overlap(size, tile, overlap):
    starts = gv.tile_starts(size, tile, overlap)
    covered = np.zeros(size, dtype=int)
    for s in starts:
        assert 0 <= s and s + min(tile, size) <= size
        covered[s:s + min(tile, size)] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap


def test_blend_ramp_is_positive_and_flat_inside():
    w = gv.blend_ramp(12, 3)
    assert (w > 0).all() and np.allclose(w[3:-3], 1) and np.allclose(w, w[::-1])
    assert np.allclose(gv.blend_ramp(5, 0), 1)


def test_model_family_and_refusal(tiny_model):
    assert gv.model_family(tiny_model) == "txt2img"
    with pytest.raises(UserError, match="needs an x4 upscaling model"):
        gv.upscale(tiny_model, rgb(8, 8), "x", **STEPS)


@pytest.mark.parametrize("attribute", ["masked_image_key", "depth_model", "low_scale_model", "embedder"])
def test_model_family_comes_from_the_class_not_from_attributes(tiny_model, attribute):
    # a text-to-image model that happens to carry another family's attribute name is still one
    setattr(tiny_model, attribute, None)
    try:
        assert gv.model_family(tiny_model) == "txt2img"
    finally:
        delattr(tiny_model, attribute)


# ------------------------------------------------------------------------------------------- inpainting
def test_blend_inpaint_keeps_known_pixels_and_resizes_the_mask(tiny_model, caplog):
    image = rgb(20, 12, seed=1)    # not a multiple of 4: padded, then cropped back
    mask = box_mask(40, 24, (8, 4, 24, 16)).convert("RGB")   # twice the size, RGB: resized and converted
    with caplog.at_level(logging.WARNING, logger="ldm"):
        out = gv.inpaint(tiny_model, image, mask, ["a", "b"], n_samples=2, **STEPS)
    assert "resizing the mask" in caplog.text
    assert len(out) == 2 and all(o.size == image.size for o in out)
    a, o = np.asarray(image), np.asarray(out[0])
    hole = np.zeros(a.shape[:2], dtype=bool)
    hole[2:8, 4:12] = True
    assert np.array_equal(o[~hole], a[~hole])
    assert not np.array_equal(o[hole], a[hole])
    again = gv.inpaint(tiny_model, image, mask, ["a", "b"], n_samples=2, **STEPS)
    assert np.array_equal(np.asarray(again[1]), np.asarray(out[1]))


def test_blend_inpaint_latent_mask_covers_every_repainted_pixel(tiny_model, monkeypatch):
    seen = {}
    original = generation.make_sampler

    def spy(name, model, **schedule):
        sampler = original(name, model, **schedule)
        sample = sampler.sample

        def recording(*args, mask=None, x0=None, **kwargs):
            seen["keep"] = mask
            return sample(*args, mask=mask, x0=x0, **kwargs)
        sampler.sample = recording
        return sampler

    monkeypatch.setattr(generation, "make_sampler", spy)
    gv.inpaint(tiny_model, rgb(16, 16), box_mask(16, 16, (3, 5, 4, 6)), "a", **STEPS)  # one pixel at (x=3, y=5)
    keep = seen["keep"][0, 0]
    assert keep.shape == (8, 8) and keep[2, 1] == 0 and keep.sum() == 63


@pytest.mark.parametrize("sampler", ["dpm", "plms", "dpmpp_2m"])
def test_blend_inpaint_with_other_samplers(tiny_model, sampler):
    image = rgb(16, 16, seed=2)
    out = gv.inpaint(tiny_model, image, box_mask(16, 16, (0, 0, 8, 8)), "a", sampler=sampler, **STEPS)
    a, o = np.asarray(image), np.asarray(out[0])
    assert np.array_equal(o[8:], a[8:]) and np.array_equal(o[:, 8:], a[:, 8:])
    assert not np.array_equal(o[:8, :8], a[:8, :8])


@pytest.fixture(scope="module")
def inpaint_model(tiny):
    return tiny.build(inpaint_config())


def test_inpainting_model_keeps_the_input_size(inpaint_model):
    image, mask = rgb(18, 14), box_mask(18, 14, (2, 2, 10, 10))
    out = gv.inpaint(inpaint_model, image, mask, "a", sampler="dpm", **STEPS)
    assert out[0].size == (18, 14)
    again = gv.inpaint(inpaint_model, image, mask, "a", sampler="dpm", **STEPS)
    assert np.array_equal(np.asarray(out[0]), np.asarray(again[0]))


# ------------------------------------------------------------------------------------------- depth
@pytest.fixture(scope="module")
def depth_model(tiny):
    return tiny.build(depth_config())   # MiDaS without weights: depth maps must be given


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])   # 8- and 16-bit depth images
def test_depth2img_with_a_depth_map(depth_model, dtype, top):
    gradient = np.tile(np.linspace(100, top, 16), (16, 1)).astype(dtype)
    shown = []
    out, depth = gv.depth2img(depth_model, rgb(16, 16), "a", depth_map=Image.fromarray(gradient), strength=0.5,
                              on_depth=shown.append, **STEPS)
    assert out[0].size == (16, 16) and shown == [depth]
    stretched = 255 * (gradient - 100.0) / (top - 100.0)
    assert np.abs(np.asarray(depth, dtype=float) - stretched).max() <= 0.51


def test_depth2img_without_depth_weights_asks_for_a_depth_map(depth_model):
    with pytest.raises(UserError, match="depth map"):
        gv.depth2img(depth_model, rgb(16, 16), "a", **STEPS)


# ------------------------------------------------------------------------------------------- upscaling
@pytest.fixture(scope="module")
def upscale_model(tiny):
    return tiny.build(upscale_config())


def test_upscale_tiles_never_exceed_the_tile_size(upscale_model):
    unet = upscale_model.model.diffusion_model
    shapes = []
    hook = unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        out = gv.upscale(upscale_model, rgb(11, 6), "a", tile=4, tile_overlap=2, noise_level=10, **STEPS)
    finally:
        hook.remove()
    assert out[0].size == (22, 12)   # the tiny VAE's factor is 2
    assert set(shapes) == {(4, 4)} and len(shapes) == 2 * 2 * 5   # 2 steps (CFG halves batched) x 2 x 5 tiles


def test_upscale_blends_tiles_back_into_place(upscale_model, monkeypatch):
    """With a sampler that returns its start noise and a decoder that repeats pixels, the tiled result
    must be the start noise of the whole image, whatever the tiling."""
    class Echo:
        model = upscale_model

        def sample(self, S, conditioning, batch_size, shape, x_T, **kwargs):
            assert conditioning["c_concat"][0].shape[-2:] == x_T.shape[-2:] == tuple(shape[1:])
            return x_T, None

    monkeypatch.setattr(generation, "make_sampler", lambda name, model, **schedule: Echo())
    monkeypatch.setattr(gv, "_pixels", lambda model, z: F.interpolate(z[:, :3], scale_factor=2).clamp(0, 1))
    out = gv.upscale(upscale_model, rgb(14, 10), "a", tile=6, tile_overlap=2, seed=3, **STEPS)
    noise = torch.from_numpy(np.random.RandomState(3).randn(1, 4, 10, 14)).float()
    expected = (255 * F.interpolate(noise[:, :3], scale_factor=2).clamp(0, 1)[0].permute(1, 2, 0)).numpy()
    assert np.abs(np.asarray(out[0], dtype=float) - expected.astype(np.uint8)).max() <= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_level=351), "noise level 351 is out of range"),
    (dict(noise_level=-1), "out of range"),
    (dict(tile=3), "tile must be 0"),
    (dict(tile=4, tile_overlap=4), "tile overlap"),
])
def test_upscale_refuses_bad_settings(upscale_model, kwargs, message):
    with pytest.raises(UserError, match=message):
        gv.upscale(upscale_model, rgb(8, 8), "a", **kwargs, **STEPS)


# ------------------------------------------------------------------------------------------- unCLIP
@pytest.fixture(scope="module")
def unclip_model(tiny, tmp_path_factory):
    stats = tmp_path_factory.mktemp("karlo") / "stats.th"
    torch.save((torch.zeros(16), torch.ones(16)), stats)
    return tiny.build(unclip_config(stats))


def test_unclip_variations_from_image_and_embedding(unclip_model, tmp_path):
    out = gv.unclip_variations(unclip_model, image=rgb(24, 20), noise_level=5, n_samples=2, **STEPS)
    assert [o.size for o in out] == [(16, 16)] * 2
    embedding = torch.randn(16)
    torch.save(embedding, tmp_path / "e.pt")
    from safetensors.torch import save_file
    save_file({"image_embeds": embedding[None]}, tmp_path / "e.safetensors")
    for name in ("e.pt", "e.safetensors"):
        loaded = gv.load_embedding(tmp_path / name)
        assert torch.equal(loaded, embedding[None])
    a = gv.unclip_variations(unclip_model, "a", embedding=loaded, **STEPS)
    b = gv.unclip_variations(unclip_model, "a", embedding=loaded, **STEPS)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_unclip_refuses_bad_embeddings_and_levels(unclip_model, tmp_path):
    with pytest.raises(UserError, match="width 8 but this model takes 16"):
        gv.unclip_variations(unclip_model, embedding=torch.randn(8), **STEPS)
    with pytest.raises(UserError, match="out of range"):
        gv.unclip_variations(unclip_model, embedding=torch.randn(16), noise_level=1000, **STEPS)
    torch.save({"a": torch.zeros(3), "b": torch.zeros(3)}, tmp_path / "two.pt")
    with pytest.raises(UserError, match="one tensor"):
        gv.load_embedding(tmp_path / "two.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot be read"):
        gv.load_embedding(tmp_path / "junk.pt")
