"""``MiDaSInference``: the frozen depth estimator of the SD 2 depth-to-image model (``depth_model.*``).

The network (DPT for ``dpt_large``/``dpt_hybrid``, the v2.1 convolutional nets for
``midas_v21``/``midas_v21_small``) is built from its architecture alone (timm/torchvision, no
pretrained weights); its weights come from the SD checkpoint's ``depth_model.*`` keys, or from a
MiDaS release file through ``load_midas_weights``. Input is what ``midas_input`` makes of an image: resized the MiDaS way
(aspect kept, sides multiples of 32, OpenCV bicubic) and normalised for the model type.
"""
import logging
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.modules.freeze import freeze_module
from ldm.modules.midas.dpt import DPTDepthModel
from ldm.modules.midas.midas_net import MidasNet, MidasNetSmall

logger = logging.getLogger(__name__)

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# model type -> (network, its input side, MiDaS resize rule, normalisation (mean, std)), as MiDaS's
# own transforms for each release
MODEL_TYPES = {
    "dpt_large": (partial(DPTDepthModel, backbone="vitl16_384"), 384, "minimal", HALF),
    "dpt_hybrid": (partial(DPTDepthModel, backbone="vitb_rn50_384"), 384, "minimal", HALF),
    "midas_v21": (MidasNet, 384, "upper_bound", IMAGENET),
    "midas_v21_small": (MidasNetSmall, 256, "upper_bound", IMAGENET),
}


def _check_model_type(model_type):
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown MiDaS model_type '{model_type}'; use one of {', '.join(MODEL_TYPES)}")


class MiDaSInference(nn.Module):
    """``forward(x)``: MiDaS input [B, 3, H, W] -> relative inverse depth [B, 1, H, W] (no gradients).

    ``net_kwargs`` override the network's hyper-parameters (tiny test models). ``has_weights`` turns true
    once a state dict with ``model.*`` entries is loaded into this module; running before that is
    a UserError, since a randomly initialised depth network silently gives meaningless depth.
    """

    MODEL_TYPES_ISL = tuple(MODEL_TYPES)

    def __init__(self, model_type, **net_kwargs):
        super().__init__()
        _check_model_type(model_type)
        self.model_type = model_type
        self.model = MODEL_TYPES[model_type][0](non_negative=True, **net_kwargs)
        self.has_weights = False
        self.register_load_state_dict_pre_hook(MiDaSInference._note_weights)
        freeze_module(self)  # the depth network is never trained here: eval mode for good

    @staticmethod
    def _note_weights(module, state_dict, prefix, *args):
        if any(key.startswith(prefix + "model.") for key in state_dict):
            module.has_weights = True

    def load_midas_weights(self, path):
        """Load a MiDaS release file (e.g. dpt_hybrid-midas-501f0c75.pt) into ``self.model``, strictly."""
        from ldm.checkpoint import read_state_dict
        sd = read_state_dict(path)
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"MiDaS weights '{path}' do not fit model_type '{self.model_type}' ({len(missing)} "
                            f"missing, {len(unexpected)} unexpected keys)")
        self.has_weights = True
        logger.info("loaded MiDaS %s weights from %s", self.model_type, path)

    @torch.no_grad()
    def forward(self, x):
        if not self.has_weights:
            raise UserError("the depth model has no weights (the checkpoint has no depth_model.* keys); pass a "
                            "depth map instead, or load MiDaS weights")
        prediction = self.model(x)
        prediction = F.interpolate(prediction.unsqueeze(1), size=x.shape[2:], mode="bicubic", align_corners=False)
        return prediction


def midas_input_size(height, width, model_type):
    """(height, width) MiDaS resizes an image to: aspect kept, sides multiples of 32.

    "minimal" (DPT) scales by whichever of side/height, side/width is closer to 1; "upper_bound"
    (v2.1) by the smaller, so the image fits in side x side.
    """
    _check_model_type(model_type)
    side, rule = MODEL_TYPES[model_type][1:3]
    scale_h, scale_w = side / height, side / width
    if rule == "minimal":
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return int(np.round(scale * height / 32) * 32), int(np.round(scale * width / 32) * 32)
    scale = min(scale_h, scale_w)

    def fit(length):  # nearest multiple of 32, unless that exceeds the side
        rounded = int(np.round(length / 32) * 32)
        return rounded if rounded <= side else int(np.floor(length / 32) * 32)
    return fit(scale * height), fit(scale * width)


def midas_input(image, model_type="dpt_hybrid"):
    """Images [B, 3, H, W] in [-1, 1] -> the float32 MiDaS input [B, 3, h, w] on the same device.

    Follows MiDaS's transform: to [0, 1], OpenCV bicubic resize (``midas_input_size``), then
    (x - mean) / std computed in float64.
    """
    import cv2  # deferred: only depth conditioning needs OpenCV
    _check_model_type(model_type)
    mean, std = (np.asarray(v, dtype=np.float64) for v in MODEL_TYPES[model_type][3])
    height, width = midas_input_size(image.shape[2], image.shape[3], model_type)
    out = []
    for img in ((image.detach().float() + 1.0) * .5).permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3]
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)
        img = (img - mean) / std
        out.append(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32))
    return torch.from_numpy(np.stack(out)).to(image.device)
