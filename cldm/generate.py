"""ControlNet sampling API: text to image steered by one or several ControlNets.

Each ``ControlUnit`` is one ControlNet with its hint, weight (control strength), step range and guess
mode; their residuals are summed (as sd-webui-controlnet does for several units). The run is
``ldm.generate.txt2img`` with the hints added to each batch's conditioning (``cldm.control``), so a
unit of weight 0, or outside its steps, leaves the images exactly the base model's.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from cldm.cldm import control_scales
from cldm.control import ControlHint
from cldm.preprocess import hint_tensor
from ldm.errors import UserError
from ldm.generate import (
    Sampling,
    latent_factor,
    model_device,
    native_size,
    sampled_steps,
    txt2img,
)


@dataclass
class ControlUnit:
    """One ControlNet in a run.

    ``hint``: the hint (PIL image, or tensor [C, H, W] / [1, C, H, W] in [0, 1]), resized to
    :func:`hint_size` when it is another size; ``weight``: the control strength; ``start``/``end``:
    the fractions of the sampling steps it acts on (sd-webui-controlnet's guidance start/end);
    ``guess_mode``: residual i weighted ``weight * 0.825 ** (12 - i)`` and the unconditional half of
    guidance left without control; ``control_model``: a further ControlNet (``cldm.loading.load_control_net``),
    None for the ControlLDM's own; ``global_average_pooling``: None for its config's (shuffle pools).
    """
    hint: object
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    control_model: object = None
    global_average_pooling: object = None


def check_unit(unit, index=0):
    if not math.isfinite(unit.weight):
        raise UserError(f"ControlNet {index}: the weight must be a finite number, got {unit.weight}")
    if not 0.0 <= unit.start <= unit.end <= 1.0:
        raise UserError(f"ControlNet {index}: its step range must satisfy 0 <= start <= end <= 1, got start "
                        f"{unit.start}, end {unit.end}")


def require_controlnet(model):
    if not hasattr(model, "control_model"):
        raise UserError(f"this is a {type(model).__name__}, not a ControlNet model (cldm.cldm.ControlLDM); load "
                        f"it with cldm.loading.load_controlnet_model")


def hint_size(model, H, W, control_model=None):
    """(w, h) of the hint for H x W images: the latent size times the hint encoder's factor (8, so
    the image size itself for SD's 8x autoencoder)."""
    net = model.control_model if control_model is None else control_model
    f = latent_factor(model)
    return W // f * net.hint_factor, H // f * net.hint_factor


def _hint_batch(unit, model, size):
    """The unit's hint as float [1, C, h, w] on the model's device, resized to ``size`` (w, h)."""
    net = model.control_model if unit.control_model is None else unit.control_model
    hint = unit.hint
    if isinstance(hint, Image.Image) and hint.size != size:
        hint = hint.resize(size, resample=Image.BILINEAR)
    hint = hint_tensor(hint, net.input_hint_block[0].in_channels)
    if tuple(hint.shape[-2:]) != (size[1], size[0]):
        hint = F.interpolate(hint, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return hint.to(model_device(model))


def control_conditioning(model, units, hints, cond, uncond, n, steps):
    """({"c_crossattn": [cond], "c_concat": [ControlHint, ...]}, the same for ``uncond`` without the
    guess-mode units) for a batch of ``n`` over ``steps`` sampling steps; ``uncond`` None stays None."""
    entries = []
    for unit, hint in zip(units, hints):
        net = model.control_model if unit.control_model is None else unit.control_model
        scales = control_scales(unit.weight, unit.guess_mode, count=net.num_residuals)
        entries.append(ControlHint(hint.expand(n, *hint.shape[1:]), tuple(scales), unit.control_model,
                                   unit.global_average_pooling, steps, unit.start, unit.end))
    with_control = {"c_crossattn": [cond], "c_concat": entries}
    if uncond is None:
        return with_control, None
    return with_control, {"c_crossattn": [uncond],
                          "c_concat": [None if unit.guess_mode else e for unit, e in zip(units, entries)]}


@contextmanager
def mid_control_only(model, only_mid_control):
    """``model.only_mid_control`` set for a run (None keeps the config's), restored after."""
    kept = model.only_mid_control
    if only_mid_control is not None:
        model.only_mid_control = bool(only_mid_control)
    try:
        yield
    finally:
        model.only_mid_control = kept


def controlnet_txt2img(model, prompts, units, *, H=None, W=None, fixed_code=False, only_mid_control=None,
                       **sampling):
    """Images from text, steered by the ``ControlUnit``s ``units`` on the ControlLDM ``model``.

    ``only_mid_control``: add only the middle block's residuals (None: as the model's config says).
    ``H``, ``W``, ``fixed_code`` and the other keyword arguments are ``ldm.generate.txt2img``'s.
    """
    require_controlnet(model)
    units = list(units)
    for i, unit in enumerate(units):
        check_unit(unit, i)
    native_h, native_w = native_size(model)
    H, W = H or native_h, W or native_w
    hints = [_hint_batch(unit, model, hint_size(model, H, W, unit.control_model)) for unit in units]
    steps = sampled_steps(Sampling(**{k: v for k, v in sampling.items() if k in ("steps", "sigmas")}))

    def conditioning(cond, uncond, n):
        return control_conditioning(model, units, hints, cond, uncond, n, steps)

    with mid_control_only(model, only_mid_control), torch.no_grad():
        return txt2img(model, prompts, H=H, W=W, fixed_code=fixed_code, conditioning=conditioning, **sampling)
