"""ControlNet sampling on a tiny ControlLDM with every kind of sampler: weight 0 gives the base model's images
exactly, guess mode weights and drops the unconditional control, several units act on their own steps."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import build_tiny_model, controlnet_config, tiny_config

from cldm.cldm import control_scales
from cldm.generate import (
    ControlUnit,
    control_conditioning,
    controlnet_txt2img,
    hint_size,
)
from ldm.errors import UserError
from ldm.generate import txt2img
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.util import instantiate_from_config

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def controlled():
    return build_tiny_model(controlnet_config(), seed=1)


@pytest.fixture(scope="module")
def base(controlled):
    """The SD model the ControlNet is attached to: the ControlLDM without its ControlNet."""
    model = instantiate_from_config(OmegaConf.create(tiny_config()).model).eval()
    model.load_state_dict({k: v for k, v in controlled.state_dict().items()
                           if not k.startswith("control_model.") and k != "logvar"})
    return model


@pytest.fixture(scope="module")
def hint():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(int)


def run(model, sampler, units=None, steps=3, **kw):
    settings = dict(steps=steps, scale=3.0, seed=5, sampler=sampler, n_samples=2, progress=False, **kw)
    if units is None:
        return pixels(txt2img(model, PROMPT, **settings))
    return pixels(controlnet_txt2img(model, PROMPT, units, **settings))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_weight_zero_is_the_base_model_and_weight_one_steers(controlled, base, hint, sampler):
    """Every sampler (DDIM, PLMS, DPM-Solver++, the sigma samplers) through the one guided call."""
    plain = run(base, sampler)
    assert np.array_equal(run(controlled, sampler, [ControlUnit(hint, weight=0.0)]), plain)
    assert np.array_equal(run(controlled, sampler, [ControlUnit(hint, weight=0.0, guess_mode=True)]), plain)
    steered = run(controlled, sampler, [ControlUnit(hint)])
    assert np.abs(steered - plain).max() > 5
    assert np.array_equal(run(controlled, sampler, [ControlUnit(hint)]), steered)   # deterministic
    assert np.abs(run(controlled, sampler, [ControlUnit(hint, guess_mode=True)]) - steered).max() > 2


def test_guess_mode_scales_and_leaves_the_unconditional_side_without_control(controlled, hint):
    cond, uncond = control_conditioning(controlled, [ControlUnit(hint, 0.8, guess_mode=True), ControlUnit(hint, 0.5)],
                                        [hint, hint], "c", "uc", n=2, steps=10)
    guess, balanced = cond["c_concat"]
    assert guess.scales == pytest.approx([0.8 * 0.825 ** (4 - i) for i in range(5)])
    assert guess.scales == tuple(control_scales(0.8, True, count=5)) and balanced.scales == (0.5,) * 5
    assert guess.hint.shape == (2, 3, 64, 64) and guess.steps == 10
    assert uncond["c_concat"] == [None, balanced] and uncond["c_crossattn"] == ["uc"]
    assert control_conditioning(controlled, [ControlUnit(hint)], [hint], "c", None, 2, 10)[1] is None


def active_units(model, monkeypatch):
    """Record, per model call, which ControlNets (by hint's first value) computed residuals."""
    calls, original = [], model.control_residuals

    def spy(x, t, context, hint, *args, **kwargs):
        calls[-1].append(round(float(hint.flatten()[0]), 3))
        return original(x, t, context, hint, *args, **kwargs)

    def apply(x, t, cond, *args, **kwargs):
        calls.append([])
        return type(model).apply_model(model, x, t, cond, *args, **kwargs)
    monkeypatch.setattr(model, "control_residuals", spy)
    monkeypatch.setattr(model, "apply_model", apply)
    return calls


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_units_act_on_their_own_steps(controlled, monkeypatch, sampler):
    early, late = torch.full((1, 3, 64, 64), 0.25), torch.full((1, 3, 64, 64), 0.75)
    calls = active_units(controlled, monkeypatch)
    run(controlled, sampler, [ControlUnit(early, end=0.5), ControlUnit(late, start=0.5)], steps=4)
    # step i acts where start <= i / 4 <= end: the early unit on steps 0-2, the late one on 2-3
    assert calls == [[0.25], [0.25], [0.25, 0.75], [0.75]]


def test_a_unit_outside_every_step_leaves_the_base_images(controlled, base, hint):
    assert np.array_equal(run(controlled, "euler_ancestral", [ControlUnit(hint, start=0.9, end=0.95)], steps=4),
                          run(base, "euler_ancestral", steps=4))


def test_two_half_units_make_one_whole(controlled, hint):
    whole = run(controlled, "ddim", [ControlUnit(hint)])
    halves = run(controlled, "ddim", [ControlUnit(hint, 0.5), ControlUnit(hint, 0.5)])
    assert np.abs(whole - halves).max() <= 1


def test_only_mid_control_is_for_the_run(controlled, hint):
    full = run(controlled, "ddim", [ControlUnit(hint)])
    mid = run(controlled, "ddim", [ControlUnit(hint)], only_mid_control=True)
    assert np.abs(full - mid).max() > 2 and controlled.only_mid_control is False


def test_hints_are_resized_to_the_hint_size(controlled):
    from PIL import Image
    assert hint_size(controlled, 16, 24) == (96, 64)   # the tiny VAE is 2x, the hint encoder 8x
    images = controlnet_txt2img(controlled, PROMPT, [ControlUnit(Image.new("RGB", (30, 20), "white"))], H=16, W=24,
                                steps=2, n_samples=1, progress=False)
    assert images[0].size == (24, 16)


@pytest.mark.parametrize("unit, message", [
    (ControlUnit(torch.rand(1, 3, 64, 64), start=0.6, end=0.4), "0 <= start <= end <= 1"),
    (ControlUnit(torch.rand(1, 3, 64, 64), weight=float("nan")), "finite"),
    (ControlUnit(torch.rand(1, 4, 64, 64)), "4 channels but this ControlNet reads 3"),
    (ControlUnit(torch.rand(1, 3, 64, 64) * 2), r"values must lie in \[0, 1\]"),
])
def test_bad_units_are_one_line_errors(controlled, unit, message):
    with pytest.raises(UserError, match=message) as err:
        controlnet_txt2img(controlled, PROMPT, [unit], steps=2, n_samples=1, progress=False)
    assert "\n" not in str(err.value)


def test_a_plain_model_is_refused(base, hint):
    with pytest.raises(UserError, match="not a ControlNet model"):
        controlnet_txt2img(base, PROMPT, [ControlUnit(hint)], steps=2)
