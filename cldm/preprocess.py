"""Hint images for ControlNet from what users have, with no downloaded annotator network.

    canny      edges (OpenCV's Canny, ``low``/``high`` thresholds), white on black
    scribble   dark strokes on a light background -> white strokes on black (ControlNet 1.0's scribble demo)
    threshold  bright parts -> white, the rest black (``threshold``, as sd-webui-controlnet's)
    depth      relative depth, white = near, from our MiDaS with its weights file (``midas``)
    none       the image is the hint already (an edge map, a depth map, a mask, ...)

The detectors run on the image resized to the hint size, as ControlNet's demos run them at the output
resolution. An image of another shape than the hint is fitted as sd-webui-controlnet's resize modes
do: "crop-and-resize" (its default) scales it to cover the hint and cuts the overhang off both sides
evenly, "resize-and-fill" scales it to fit inside and pads the hint with black (no edges, no mask, far
depth) on both sides, "just-resize" stretches it. Hints come back as RGB images; ``hint_tensor`` makes the [1, C, H, W] tensor in [0, 1]
the ControlNet reads. Problems with the image are one-line ``UserError``s.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.errors import UserError

PREPROCESSORS = ("canny", "depth", "scribble", "threshold", "none")
# the names sd-webui-controlnet writes for these into PNG metadata ("Module: ...")
MODULE_NAMES = {"canny": "canny", "depth": "depth_midas", "scribble": "scribble", "threshold": "threshold",
                "none": "none"}
# flag value -> the name sd-webui-controlnet writes ("Resize Mode: ...")
RESIZE_MODES = {"crop-and-resize": "Crop and Resize", "just-resize": "Just Resize", "resize-and-fill": "Resize and Fill"}
DEPTH_WEIGHTS_ADVICE = "give a MiDaS weights file (e.g. dpt_hybrid-midas-501f0c75.pt), or a depth map with 'none'"


def open_hint_image(path, what="hint image"):
    """The image file ``path`` (its mode kept), or a one-line UserError: missing, empty, unreadable."""
    from ldm.generate_variants import open_image
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty (0 bytes); give a PNG or JPEG image")
    return open_image(path, what)


def as_rgb(image, what="hint image"):
    """``image`` as RGB: 16-bit and float images (depth maps) stretched to 0..255; an image whose
    transparency would be lost is refused."""
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise UserError(f"{what} has transparent pixels, and a ControlNet hint has no alpha channel; "
                            f"save it on an opaque background")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        lo, hi = values.min(), values.max()
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    return image.convert("RGB")


def centre_crop_to_aspect(image, size):
    """The middle of ``image`` with the aspect ratio of ``size`` (w, h), as large as it fits."""
    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    keep_w, keep_h = min(width, round(size[0] / scale)), min(height, round(size[1] / scale))
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return image.crop((left, top, left + keep_w, top + keep_h))


def inner_size(image_size, size):
    """The largest (w, h) of ``image_size``'s aspect ratio inside ``size``."""
    scale = min(size[0] / image_size[0], size[1] / image_size[1])
    return max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))


def pad_centred(hint, size):
    canvas = Image.new("RGB", size)
    canvas.paste(hint, ((size[0] - hint.size[0]) // 2, (size[1] - hint.size[1]) // 2))
    return canvas


def preprocess(image, name, size, *, low=100, high=200, threshold=127, midas=None, what="hint image",
               resize_mode="crop-and-resize"):
    """The hint (RGB PIL image of ``size`` (w, h)) that preprocessor ``name`` makes of ``image``.

    ``low``/``high``: canny's thresholds; ``threshold``: scribble's and threshold's binarisation
    level (0..255); ``midas``: a ``MiDaSInference`` with weights, for depth (see :func:`load_midas`);
    ``resize_mode``: one of ``RESIZE_MODES``, how an image of another aspect ratio is fitted.
    A hint with nothing in it (one colour everywhere) is a UserError.
    """
    if name not in PREPROCESSORS:
        raise UserError(f"unknown preprocessor '{name}'; use one of {', '.join(PREPROCESSORS)}")
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode '{resize_mode}'; use one of {', '.join(RESIZE_MODES)}")
    size = tuple(size)
    if resize_mode == "crop-and-resize":
        image = centre_crop_to_aspect(image, size)
    elif resize_mode == "resize-and-fill" and image.size != size:
        inner = inner_size(image.size, size)
        hint = preprocess(image, name, inner, low=low, high=high, threshold=threshold, midas=midas, what=what,
                          resize_mode="just-resize")
        return pad_centred(hint, size)
    if name == "depth":
        hint = depth_hint(image, size, midas, what)
    elif name == "none":
        hint = as_rgb(image, what).resize(size, resample=Image.BILINEAR)
    else:
        pixels = np.asarray(as_rgb(image, what).resize(size, resample=Image.LANCZOS))
        hint = Image.fromarray(DETECTORS[name](pixels, low=low, high=high, threshold=threshold)).convert("RGB")
    if np.ptp(np.asarray(hint)) == 0:
        raise UserError(f"the {name} hint of {what} is blank (one colour everywhere), so it would steer nothing; "
                        + BLANK_ADVICE[name])
    return hint


def canny(pixels, low=100, high=200, **_):
    """Edges [H, W] uint8 (255 = edge) of RGB ``pixels`` [H, W, 3]; OpenCV takes the strongest channel."""
    import cv2  # deferred: only canny needs OpenCV here
    if not 0 <= low <= high:
        raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got low {low}, high {high}")
    return cv2.Canny(pixels, float(low), float(high))


def scribble(pixels, threshold=127, **_):
    """White (255) where the darkest channel is below ``threshold``: strokes drawn dark on light."""
    _check_level(threshold)
    return np.where(pixels.min(axis=2) < threshold, 255, 0).astype(np.uint8)


def binarise(pixels, threshold=127, **_):
    """White (255) where even the darkest channel is above ``threshold``."""
    _check_level(threshold)
    return np.where(pixels.min(axis=2) > threshold, 255, 0).astype(np.uint8)


def _check_level(threshold):
    if not 0 <= threshold <= 255:
        raise UserError(f"the binarisation threshold must be from 0 to 255, got {threshold}")


DETECTORS = {"canny": canny, "scribble": scribble, "threshold": binarise}
BLANK_ADVICE = {
    "canny": "lower the canny thresholds, or use an image with visible edges",
    "scribble": "draw dark strokes on a light background, or change the threshold",
    "threshold": "change the threshold, or use an image with bright and dark parts",
    "depth": "use an image with visible depth",
    "none": "give an image with the hint drawn in it",
}


def load_midas(weights, model_type="dpt_hybrid"):
    """Our ``MiDaSInference`` of ``model_type`` with the MiDaS release file ``weights`` loaded."""
    from ldm.modules.midas.api import MiDaSInference
    midas = MiDaSInference(model_type)
    midas.load_midas_weights(weights)
    return midas


def depth_hint(image, size, midas, what="hint image"):
    """Relative depth of ``image`` as an RGB image of ``size`` (w, h): white near, black far, each map
    stretched to its own range (as ControlNet's depth annotator normalises)."""
    import torch

    from ldm.generate_variants import depth_to_image
    from ldm.image_io import images_to_tensor
    from ldm.modules.midas.api import midas_input
    if midas is None or not getattr(midas, "has_weights", False):
        raise UserError(f"the depth preprocessor needs MiDaS weights for {what}; {DEPTH_WEIGHTS_ADVICE}")
    device = next(midas.parameters()).device
    with torch.no_grad():
        pixels = images_to_tensor([as_rgb(image, what)]).to(device)
        depth = midas(midas_input(pixels, midas.model_type))
    return depth_to_image(depth, size).convert("RGB")


def hint_tensor(hint, channels):
    """A hint (PIL image, or a tensor [C, H, W] / [1, C, H, W] in [0, 1]) as float [1, channels, H, W]."""
    import torch
    if isinstance(hint, Image.Image):
        if channels not in (1, 3):
            raise UserError(f"this ControlNet reads {channels}-channel hints; an image gives 1 (grey) or 3 (RGB): "
                            f"pass the hint as a tensor")
        array = np.asarray(hint.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        hint = torch.from_numpy(array.reshape(*array.shape[:2], channels)).permute(2, 0, 1)   # h w c -> c h w
    hint = torch.as_tensor(hint, dtype=torch.float32)
    hint = hint[None] if hint.ndim == 3 else hint
    if hint.ndim != 4 or hint.shape[0] != 1:
        raise UserError(f"a hint tensor must be [C, H, W] or [1, C, H, W], got {list(hint.shape)}")
    if hint.shape[1] != channels:
        raise UserError(f"the hint has {hint.shape[1]} channels but this ControlNet reads {channels}; "
                        f"give a {'grey' if channels == 1 else 'RGB' if channels == 3 else f'{channels}-channel'} hint")
    if hint.min() < 0 or hint.max() > 1:
        raise UserError(f"hint values must lie in [0, 1], got {hint.min():.3g} to {hint.max():.3g}")
    return hint
