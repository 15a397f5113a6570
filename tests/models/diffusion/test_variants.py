"""The image-conditioned SD 2 families on tiny random-weight models: inpainting, depth-to-image,
x4 upscaling and unCLIP. Each runs forward and a 2-step DDIM sample through its conditioning
builder; the conditioning is checked against formulas written out independently here."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.conditioning import (depth_conditioning, inpaint_conditioning, text_conditioning, unclip_conditioning,
                              upscale_conditioning)
from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from tiny_models import depth_config, inpaint_config, unclip_config, upscale_config


def images(n=1, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def ddim_two_steps(model, conditioning, scale=3.0):
    sampler = DDIMSampler(model)
    n = conditioning.cond["c_crossattn"][0].shape[0]
    torch.manual_seed(0)
    samples, _ = sampler.sample(2, n, list(conditioning.shape), conditioning.cond, verbose=False, eta=0.0,
                                unconditional_guidance_scale=scale, unconditional_conditioning=conditioning.uncond)
    assert samples.shape == (n, *conditioning.shape)
    assert torch.isfinite(samples).all()
    return samples


def linear_alphas_cumprod(start, end, n=1000):
    """alpha_bar of the "linear" schedule (linear in sqrt(beta)), in float64."""
    betas = np.linspace(start ** 0.5, end ** 0.5, n) ** 2
    return np.cumprod(1 - betas)


# ------------------------------------------------------------------------------------------- inpainting
@pytest.fixture(scope="module")
def inpaint_model(tiny):
    return tiny.build(inpaint_config())


def test_inpaint_forward_and_sample(inpaint_model):
    cond = inpaint_conditioning(inpaint_model, images(), torch.ones(1, 1, 16, 16), ["a", "b"])
    assert cond.cond["c_concat"][0].shape == (2, 5, 8, 8) and cond.shape == (4, 8, 8)
    z = torch.randn(2, 4, 8, 8)
    out = inpaint_model.apply_model(z, torch.tensor([10, 500]), cond.cond)
    assert out.shape == z.shape
    ddim_two_steps(inpaint_model, cond)


def test_inpaint_concat_is_nearest_mask_and_masked_image_latent(inpaint_model):
    model = inpaint_model
    image = images(seed=1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:9] = 1.0
    torch.manual_seed(3)
    c_cat = inpaint_conditioning(model, image, mask * 0.7 + 0.2, "x").cond["c_concat"][0]  # binarised at 0.5
    torch.manual_seed(3)
    posterior = model.first_stage_model.encode(image * (1 - mask))
    expected_latent = model.scale_factor * posterior.sample()
    torch.testing.assert_close(c_cat[:, :1], mask[..., ::2, ::2])  # nearest 2x downsampling = top-left pixel
    torch.testing.assert_close(c_cat[:, 1:], expected_latent)


def test_inpaint_mask_all_ones_hides_the_image_all_zeros_shows_it(inpaint_model):
    model = inpaint_model
    a, b = images(seed=1), images(seed=2)
    ones, zeros = torch.ones(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    cat = {}
    for name, image, mask in (("a1", a, ones), ("b1", b, ones), ("a0", a, zeros), ("b0", b, zeros)):
        torch.manual_seed(5)
        cat[name] = inpaint_conditioning(model, image, mask, "x").cond["c_concat"][0]
    torch.testing.assert_close(cat["a1"], cat["b1"])  # everything repainted: the image is not seen
    assert not torch.allclose(cat["a0"], cat["b0"])    # nothing repainted: the latent is the image's
    torch.manual_seed(5)
    torch.testing.assert_close(cat["a0"][:, 1:], model.scale_factor * model.first_stage_model.encode(a).sample())
    assert (cat["a1"][:, 0] == 1).all() and (cat["a0"][:, 0] == 0).all()


def test_inpaint_get_input_takes_dataset_layout(inpaint_model):
    model = inpaint_model
    image = images(2).permute(0, 2, 3, 1)  # [B, H, W, C], as datasets give it
    mask = (torch.rand(2, 16, 16, 1) > 0.5).float()
    batch = {"jpg": image, "txt": ["a", "b"], "mask": mask, "masked_image": image * (1 - mask)}
    z, cond = model.get_input(batch, "jpg")
    assert z.shape == (2, 4, 8, 8) and cond["c_concat"][0].shape == (2, 5, 8, 8)
    torch.testing.assert_close(cond["c_concat"][0][:, :1], mask.permute(0, 3, 1, 2)[..., ::2, ::2])
    loss, _ = model(z, cond)
    assert torch.isfinite(loss)


def test_four_channel_checkpoint_loads_via_finetune_keys(tiny, tmp_path):
    base = tiny.build(seed=1)
    ckpt = tmp_path / "txt2img.ckpt"
    torch.save({"state_dict": base.state_dict()}, ckpt)
    config = inpaint_config()
    del config["model"]["params"]["finetune_keys"]  # the default: the U-Net input conv (and its EMA copy)
    config["model"]["params"]["ckpt_path"] = str(ckpt)
    wide = tiny.build(config, seed=2)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = wide.state_dict()[key]
    assert w.shape[1] == 9
    torch.testing.assert_close(w[:, :4], base.state_dict()[key])
    assert (w[:, 4:] == 0).all()
    # zero-initialised extra channels: whatever the concat holds, the output is the 4-channel model's
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    c = base.get_learned_conditioning(["a cat", "a dog"])
    with torch.no_grad():
        expected = base.apply_model(z, t, c)
        got = wide.apply_model(z, t, {"c_concat": [torch.randn(2, 5, 8, 8)], "c_crossattn": [c]})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_finetune_keys_need_a_checkpoint(tiny):
    config = inpaint_config()
    del config["model"]["params"]["finetune_keys"]
    with pytest.raises(UserError, match="ckpt_path"):
        tiny.build(config)


# ------------------------------------------------------------------------------------------- depth
@pytest.fixture(scope="module")
def depth_model(tiny):
    model = tiny.build(depth_config())
    model.depth_model.has_weights = True  # random weights stand in for a loaded MiDaS
    return model


def test_depth_normalisation_formula_and_range(depth_model):
    depth = torch.rand(2, 1, 24, 40) * 7 + 3
    got = depth_conditioning(depth_model, ["a", "b"], depth=depth, size=(16, 16)).cond["c_concat"][0]
    resized = F.interpolate(depth, size=(8, 8), mode="bicubic", align_corners=False)
    lo = resized.flatten(1).min(1).values.view(2, 1, 1, 1)
    hi = resized.flatten(1).max(1).values.view(2, 1, 1, 1)
    torch.testing.assert_close(got, 2 * (resized - lo) / (hi - lo) - 1)
    assert torch.allclose(got.flatten(1).min(1).values, torch.tensor(-1.))
    assert torch.allclose(got.flatten(1).max(1).values, torch.tensor(1.))
    # training normalisation (get_input) keeps 1e-3 in the denominator, so stays just below 1
    batch = {"jpg": images(2).permute(0, 2, 3, 1), "txt": ["a", "b"], "depth": depth}
    _, cond = depth_model.get_input(batch, "jpg")
    torch.testing.assert_close(cond["c_concat"][0], 2 * (resized - lo) / (hi - lo + 1e-3) - 1)


def test_depth_from_midas_and_sample(depth_model):
    cond = depth_conditioning(depth_model, "a house", image=images(size=64))
    assert cond.cond["c_concat"][0].shape == (1, 1, 32, 32) and cond.shape == (4, 32, 32)
    assert cond.extras["depth"].shape == (1, 1, 384, 384)  # MiDaS runs at its own input size
    c = cond.cond["c_concat"][0]
    assert c.min() == -1 and c.max() <= 1
    small = depth_conditioning(depth_model, "a house", depth=torch.rand(1, 1, 16, 16), size=(16, 16))
    ddim_two_steps(depth_model, small)


def test_depth_without_weights_needs_a_depth_map(tiny):
    model = tiny.build(depth_config())
    with pytest.raises(UserError, match="depth map"):
        depth_conditioning(model, "x", image=images(size=64))
    cond = depth_conditioning(model, "x", image=images(size=16), depth=torch.rand(1, 1, 16, 16))
    assert cond.cond["c_concat"][0].shape == (1, 1, 8, 8)
    # a checkpoint with depth_model.* keys provides the weights
    model.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("depth_model.")}, strict=False)
    assert depth_conditioning(model, "x", image=images(size=16)).cond["c_concat"][0].shape == (1, 1, 8, 8)


# ------------------------------------------------------------------------------------------- x4 upscaler
@pytest.fixture(scope="module")
def upscale_model(tiny):
    return tiny.build(upscale_config())


def test_low_res_noise_augmentation_formula(upscale_model):
    model = upscale_model
    x_low = images(2, size=8)
    alphas_cumprod = linear_alphas_cumprod(1e-4, 0.02)
    for level in (0, 20, 350):
        torch.manual_seed(7)
        noised, levels = model.low_res_conditioning(x_low, level)
        torch.manual_seed(7)
        noise = torch.randn_like(x_low)
        a = float(np.sqrt(alphas_cumprod[level]))
        s = float(np.sqrt(1 - alphas_cumprod[level]))
        torch.testing.assert_close(noised, a * x_low + s * noise)
        assert levels.tolist() == [level, level] and levels.dtype == torch.long
    persistent = [k for k in model.state_dict() if k.startswith("low_scale_model.")]
    assert len(persistent) == 8


@pytest.mark.parametrize("level", [-1, 351, 1000])
def test_noise_level_out_of_range(upscale_model, level):
    with pytest.raises(UserError, match="noise_level"):
        upscale_conditioning(upscale_model, images(size=8), "x", noise_level=level)


def test_upscale_forward_and_sample(upscale_model):
    cond = upscale_conditioning(upscale_model, images(size=8), ["a", "b"], noise_level=20)
    assert cond.cond["c_adm"].tolist() == [20, 20] and cond.shape == (4, 8, 8)
    assert cond.uncond["c_adm"] is cond.cond["c_adm"]  # the official scripts guide on text only
    batch = {"jpg": images(2).permute(0, 2, 3, 1), "txt": ["a", "b"], "lr": images(2, size=8).permute(0, 2, 3, 1)}
    z, c = upscale_model.get_input(batch, "jpg")
    assert c["c_concat"][0].shape == (2, 3, 8, 8) and c["c_adm"].shape == (2,)
    assert upscale_model.apply_model(z, torch.tensor([1, 2]), c).shape == z.shape
    ddim_two_steps(upscale_model, cond)


# ------------------------------------------------------------------------------------------- unCLIP
@pytest.fixture(scope="module")
def clip_stats(tmp_path_factory):
    path = tmp_path_factory.mktemp("karlo") / "stats.th"
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5), path)
    return path


@pytest.fixture(scope="module")
def unclip_model(tiny, clip_stats):
    return tiny.build(unclip_config(clip_stats))


def test_clip_embedding_noise_augmentation_formula(unclip_model, clip_stats):
    mean, std = torch.load(clip_stats, weights_only=True)
    emb = torch.randn(3, 16)
    # squaredcos_cap_v2: alpha_bar(t) = cos^2((t/T + 0.008) / 1.008 * pi/2), betas capped at 0.999
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    betas = np.minimum([1 - f(i + 1) / f(i) for i in range(1000)], 0.999)
    alphas_cumprod = np.cumprod(1 - betas)
    for level in (0, 123):
        torch.manual_seed(4)
        adm = unclip_model.adm_conditioning(emb, noise_level=level)
        torch.manual_seed(4)
        noise = torch.randn(3, 16)
        a, s = float(np.sqrt(alphas_cumprod[level])), float(np.sqrt(1 - alphas_cumprod[level]))
        expected = (a * (emb - mean) / std + s * noise) * std + mean
        freqs = np.exp(-np.log(10000) * np.arange(8) / 8)
        level_emb = torch.tensor(np.concatenate([np.cos(level * freqs), np.sin(level * freqs)]), dtype=torch.float32)
        torch.testing.assert_close(adm[:, :16], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adm[:, 16:], level_emb.expand(3, 16))
    keys = [k for k in unclip_model.state_dict() if k.startswith("noise_augmentor.")]
    assert len(keys) == 8 and "noise_augmentor.data_mean" not in keys


def test_unclip_forward_and_sample(unclip_model):
    cond = unclip_conditioning(unclip_model, ["a", "b"], image=images(size=40), noise_level=10, size=(16, 16))
    assert cond.cond["c_adm"].shape == (2, 32) and (cond.uncond["c_adm"] == 0).all()
    assert cond.shape == (4, 8, 8)
    ddim_two_steps(unclip_model, cond)
    given = unclip_conditioning(unclip_model, "a", embedding=torch.randn(1, 16), size=(16, 16))
    assert given.cond["c_adm"].shape == (1, 32)


def test_unclip_get_input_drops_embeddings_only_in_training(unclip_model):
    model = copy.deepcopy(unclip_model)
    batch = {"jpg": images(8).permute(0, 2, 3, 1), "txt": 8 * ["a"]}
    _, cond = model.get_input(batch, "jpg")
    assert (cond["c_adm"].abs().sum(1) > 0).all()
    model.train()
    model.embedding_dropout = 1.0
    _, cond = model.get_input(batch, "jpg")
    assert (cond["c_adm"] == 0).all()


def test_missing_clip_stats_file_is_named(tiny, tmp_path):
    missing = tmp_path / "karlo" / "ViT-L-14_stats.th"
    with pytest.raises(UserError, match="ViT-L-14_stats.th"):
        tiny.build(unclip_config(missing))


def test_text_conditioning_pairs_prompt_and_negative(unclip_model):
    c, uc = text_conditioning(unclip_model, ["a", "b"], negative_prompt="blurry")
    assert c.shape == uc.shape and torch.equal(uc[0], uc[1]) and not torch.equal(c[0], uc[0])


def test_builders_refuse_the_wrong_family(inpaint_model):
    with pytest.raises(UserError, match="upscaling"):
        upscale_conditioning(inpaint_model, images(size=8), "x", noise_level=0)


# ------------------------------------------------------------------------------------------- VAE attention
def test_vanilla_xformers_vae_attention_equals_vanilla(tiny):
    from ldm.models.autoencoder import AutoencoderKL
    params = copy.deepcopy(tiny.config()["model"]["params"]["first_stage_config"]["params"])
    torch.manual_seed(0)
    vanilla = AutoencoderKL(**params)
    params["ddconfig"]["attn_type"] = "vanilla-xformers"
    other = AutoencoderKL(**params)
    other.load_state_dict(vanilla.state_dict())
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(other.encode(x).mode(), vanilla.encode(x).mode())
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(other.decode(z), vanilla.decode(z))


# ------------------------------------------------------------------------------------------- inputs and loading
def test_pil_inputs_match_tensors(inpaint_model):
    from PIL import Image
    pixels = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 251).astype(np.uint8)
    mask_pixels = np.zeros((16, 16), dtype=np.uint8)
    mask_pixels[3:10, 5:13] = 255
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.from_numpy(mask_pixels)[None, None].float() / 255
    torch.manual_seed(0)
    from_pil = inpaint_conditioning(inpaint_model, Image.fromarray(pixels), Image.fromarray(mask_pixels), "x")
    torch.manual_seed(0)
    from_tensors = inpaint_conditioning(inpaint_model, image, mask, "x")
    torch.testing.assert_close(from_pil.cond["c_concat"][0], from_tensors.cond["c_concat"][0])


def test_image_size_must_fit_the_unet(inpaint_model):
    with pytest.raises(UserError, match="multiples of 4"):
        inpaint_conditioning(inpaint_model, images(size=18), torch.ones(1, 1, 18, 18), "x")


def test_depth_checkpoint_round_trip_through_the_loader(tiny, depth_model, tmp_path):
    from ldm.checkpoint import load_model
    config = tiny.write_config(depth_config(), tmp_path / "depth.yaml")
    torch.save({"state_dict": depth_model.state_dict()}, tmp_path / "depth.ckpt")
    loaded = load_model(config, tmp_path / "depth.ckpt", device="cpu")
    assert loaded.depth_model.has_weights
    depth = torch.rand(1, 1, 64, 64)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded.depth_model(x), depth_model.depth_model(x))
    ours, reference = (depth_conditioning(m, "x", image=images(size=16), depth=depth) for m in (loaded, depth_model))
    torch.testing.assert_close(ours.cond["c_concat"][0], reference.cond["c_concat"][0])
