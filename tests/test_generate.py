import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.generate import (batches, img2img, latent_factor, make_sampler, native_size,
                          precision_scope, txt2img)

FAST = dict(steps=4, progress=False)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def init_image(w=80, h=64, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def test_model_facts(tiny_model):
    assert latent_factor(tiny_model) == 2
    assert native_size(tiny_model) == (16, 16)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm"])
def test_txt2img_each_sampler(tiny_model, sampler):
    images = txt2img(tiny_model, "a red circle", sampler=sampler, n_samples=2, n_iter=2, **FAST)
    assert len(images) == 4
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    assert pixels(images).std() > 0


def test_same_seed_same_images_other_seed_other_images(tiny_model):
    a = pixels(txt2img(tiny_model, "a blue square", seed=7, n_samples=2, **FAST))
    b = pixels(txt2img(tiny_model, "a blue square", seed=7, n_samples=2, **FAST))
    c = pixels(txt2img(tiny_model, "a blue square", seed=8, n_samples=2, **FAST))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])      # each sample in a batch has its own noise


def test_start_code_is_the_first_draw_after_seeding(tiny_model):
    # official order: a fixed code is drawn where the sampler would draw its own start noise
    fixed = txt2img(tiny_model, "a circle", seed=3, n_samples=2, fixed_code=True, **FAST)
    drawn = txt2img(tiny_model, "a circle", seed=3, n_samples=2, fixed_code=False, **FAST)
    assert np.array_equal(pixels(fixed), pixels(drawn))


def test_fixed_code_repeats_across_iterations(tiny_model):
    fixed = pixels(txt2img(tiny_model, "a circle", n_iter=2, fixed_code=True, **FAST))
    free = pixels(txt2img(tiny_model, "a circle", n_iter=2, fixed_code=False, **FAST))
    assert np.array_equal(fixed[0], fixed[1])
    assert not np.array_equal(free[0], free[1])


def test_prompt_and_negative_prompt_matter_only_with_guidance(tiny_model):
    def run(prompt, negative, scale):
        return pixels(txt2img(tiny_model, prompt, negative_prompt=negative, scale=scale, **FAST))
    base = run("a red circle", "", 7.5)
    assert not np.array_equal(base, run("a green triangle", "", 7.5))
    assert not np.array_equal(base, run("a red circle", "a green triangle", 7.5))
    assert np.array_equal(run("a red circle", "", 1.0), run("a red circle", "anything", 1.0))


def test_size_and_prompt_batches(tiny_model):
    seen = []
    images = txt2img(tiny_model, ["one", "two", "three"], n_samples=2, H=24, W=32,
                     on_batch=lambda ims, prompts: seen.append((len(ims), prompts)), **FAST)
    assert [im.size for im in images] == [(32, 24)] * 3
    assert seen == [(2, ["one", "two"]), (1, ["three"])]
    assert batches("x", 3) == [["x", "x", "x"]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(H=20), "multiples of 8"),
    (dict(W=0, H=-8), "multiples of 8"),
    (dict(sampler="euler_b"), "unknown sampler"),
    (dict(steps=0), "steps must be from 1"),
    (dict(steps=1001), "steps must be from 1"),
    (dict(n_samples=0), "at least 1"),
    (dict(sampler="plms", eta=0.5), "PLMS has no eta"),
    (dict(seed=-1), "out of range"),
    (dict(precision="double"), "precision"),
])
def test_txt2img_impossible_settings(tiny_model, kwargs, message):
    with pytest.raises(UserError, match=message):
        txt2img(tiny_model, "x", **{**FAST, **kwargs})


def test_bf16_autocast_on_cpu(tiny_model):
    images = txt2img(tiny_model, "a circle", bf16=True, **FAST)
    assert images[0].size == (16, 16)
    # forced: bf16=True on a CPU without native bfloat16 runs float32 (tests/test_precision.py)
    with precision_scope(torch.device("cpu"), "autocast", bf16="force"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    with precision_scope(torch.device("cpu"), "autocast", bf16=False):
        assert not torch.is_autocast_enabled("cpu")


def test_make_sampler_names(tiny_model):
    assert type(make_sampler("plms", tiny_model)).__name__ == "PLMSSampler"
    with pytest.raises(UserError, match="unknown sampler"):
        make_sampler("euler_b", tiny_model)


def test_img2img_resizes_and_is_reproducible(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.generate"):
        a = img2img(tiny_model, init_image(), "a circle", strength=0.5, n_samples=2, **FAST)
    assert "resized from 80x64 to 64x64" in caplog.text
    assert [im.size for im in a] == [(64, 64)] * 2
    b = img2img(tiny_model, init_image(), "a circle", strength=0.5, n_samples=2, **FAST)
    assert np.array_equal(pixels(a), pixels(b))
    other = img2img(tiny_model, init_image(seed=1), "a circle", strength=0.5, n_samples=2, **FAST)
    assert not np.array_equal(pixels(a), pixels(other))


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_img2img_strength_limits_run(tiny_model, strength):
    images = img2img(tiny_model, init_image(64, 64), ["a", "b", "c"], strength=strength,
                     n_samples=2, **FAST)
    assert len(images) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=1.5), "strength must be from 0.0 to 1.0"),
    (dict(strength=-0.1), "strength must be from 0.0 to 1.0"),
])
def test_img2img_impossible_settings(tiny_model, kwargs, message):
    with pytest.raises(UserError, match=message):
        img2img(tiny_model, init_image(), "x", **{**FAST, **kwargs})


@pytest.mark.parametrize("sampler, like", [("plms", "ddim"), ("dpm", "euler")])
def test_img2img_with_plms_and_dpm_solver(tiny_model, sampler, like):
    # both start part-way down their schedule; at strength 0, PLMS keeps the image as DDIM does (noised
    # to the first DDIM timestep) and DPM-Solver++ as the sigma samplers do (the latent itself)
    kept = img2img(tiny_model, init_image(64, 64), "x", strength=0.0, sampler=sampler, **FAST)
    ddim_kept = img2img(tiny_model, init_image(64, 64), "x", strength=0.0, sampler=like, **FAST)
    changed = img2img(tiny_model, init_image(64, 64), "x", strength=0.6, sampler=sampler, **FAST)
    assert np.array_equal(np.asarray(kept[0]), np.asarray(ddim_kept[0]))
    assert not np.array_equal(np.asarray(changed[0]), np.asarray(kept[0]))


def test_img2img_init_too_small(tiny_model):
    with pytest.raises(UserError, match="at least 64x64"):
        img2img(tiny_model, init_image(63, 128), "x", **FAST)


# ---------------------------------------------------------------------------------------------
# prompts as the web UIs read them

def _arrays(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_long_prompts_are_encoded_in_chunks_not_cut(tiny_model):
    settings = dict(steps=2, n_samples=1, seed=3, progress=False)
    long, first_75 = " ".join(["cat"] * 100), " ".join(["cat"] * 75)
    cut = _arrays(txt2img(tiny_model, first_75, **settings))
    assert all((a == b).all() for a, b in zip(_arrays(txt2img(tiny_model, long, truncate=True, **settings)), cut))
    assert any((a != b).any() for a, b in zip(_arrays(txt2img(tiny_model, long, **settings)), cut))


def test_long_prompt_against_a_short_negative_prompt_is_padded(tiny_model):
    from ldm.generate import Sampling, text_conditioning
    c, uc = text_conditioning(tiny_model, [" ".join(["cat"] * 100)], Sampling(negative_prompt="dog"))
    assert c.shape[1] == uc.shape[1] == 154


def test_emphasis_changes_the_image_and_none_reads_brackets_as_text(tiny_model):
    settings = dict(steps=2, n_samples=1, seed=3, progress=False)
    weighted = _arrays(txt2img(tiny_model, "a (cat:1.6)", **settings))
    literal = _arrays(txt2img(tiny_model, "a (cat:1.6)", emphasis="none", **settings))
    plain = _arrays(txt2img(tiny_model, "a cat", **settings))
    assert any((a != b).any() for a, b in zip(weighted, literal))
    assert any((a != b).any() for a, b in zip(weighted, plain))


def test_prompt_editing_switches_prompts_during_sampling(tiny_model):
    from ldm.generate import Sampling, text_conditioning
    settings = dict(steps=4, n_samples=1, seed=3, progress=False)
    edited = _arrays(txt2img(tiny_model, "a [cat:dog:2]", **settings))
    cat, dog = _arrays(txt2img(tiny_model, "a cat", **settings)), _arrays(txt2img(tiny_model, "a dog", **settings))
    assert (edited[0] != cat[0]).any() and (edited[0] != dog[0]).any()
    # the same text on both sides of an edit is the plain prompt, bit for bit
    same = _arrays(txt2img(tiny_model, "a [cat:cat:2]", **settings))
    assert (same[0] == cat[0]).all()
    # the negative prompt takes the syntax too, and img2img spreads an edit over the steps it runs
    c, uc = text_conditioning(tiny_model, ["a cat"], Sampling(negative_prompt="[x|y]", steps=10), strength=0.4)
    assert len(uc) == 4 and torch.equal(uc.at(0), uc.at(2)) and not torch.equal(uc.at(0), uc.at(1))
    assert c.is_constant


def test_zero_terminal_snr_models_sample_ddim_on_trailing_steps(tiny, tiny_model):
    from ldm.generate import Sampling, timestep_spacing
    zero_snr = tiny.build(tiny.config(parameterization="v", rescale_betas_zero_snr=True), seed=1)
    assert timestep_spacing(zero_snr, Sampling(sampler="ddim")) == "trailing"
    assert timestep_spacing(zero_snr, Sampling(sampler="plms")) == "trailing"
    assert timestep_spacing(zero_snr, Sampling(sampler="ddim", timestep_spacing="leading")) == "leading"
    assert timestep_spacing(zero_snr, Sampling(sampler="euler")) is None
    assert timestep_spacing(tiny_model, Sampling(sampler="ddim")) is None
    trailing = txt2img(zero_snr, "a cat", steps=3, seed=1, progress=False, timestep_spacing="trailing")
    default = txt2img(zero_snr, "a cat", steps=3, seed=1, progress=False)
    leading = txt2img(zero_snr, "a cat", steps=3, seed=1, progress=False, timestep_spacing="leading")
    assert np.array_equal(np.asarray(default[0]), np.asarray(trailing[0]))
    assert not np.array_equal(np.asarray(default[0]), np.asarray(leading[0]))
