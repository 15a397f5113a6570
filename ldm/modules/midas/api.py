"""``MiDaSInference``: the frozen depth estimator of the SD 2 depth-to-image model (``depth_model.*``).

The network is built from its architecture alone (timm, ``pretrained=False``); its weights come
from the SD checkpoint's ``depth_model.*`` keys, or from a MiDaS release file through
``load_midas_weights``. Input is what ``midas_input`` makes of an image: resized the MiDaS way
(aspect kept, sides multiples of 32, OpenCV bicubic) and normalised for the model type.
"""
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.modules.midas.dpt import DPTDepthModel

logger = logging.getLogger(__name__)

# model type -> (DPT backbone, network input side, MiDaS resize rule, normalisation mean, std)
MODEL_TYPES = {
    "dpt_large": ("vitl16_384", 384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dpt_hybrid": ("vitb_rn50_384", 384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Known to the official code but built there from torch.hub code and weights (a download).
HUB_ONLY_TYPES = ("midas_v21", "midas_v21_small")


def _check_model_type(model_type):
    if model_type in HUB_ONLY_TYPES:
        raise UserError(f"MiDaS model_type '{model_type}' needs torch.hub downloads and is not supported; "
                        f"use one of {', '.join(MODEL_TYPES)}")
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown MiDaS model_type '{model_type}'; use one of {', '.join(MODEL_TYPES)}")


class MiDaSInference(nn.Module):
    """``forward(x)``: MiDaS input [B, 3, H, W] -> relative inverse depth [B, 1, H, W] (no gradients).

    ``dpt_kwargs`` override the DPT hyper-parameters (tiny test models). ``has_weights`` turns true
    once a state dict with ``model.*`` entries is loaded into this module; running before that is
    a UserError, since a randomly initialised depth network silently gives meaningless depth.
    """

    MODEL_TYPES_ISL = tuple(MODEL_TYPES) + HUB_ONLY_TYPES

    def __init__(self, model_type, **dpt_kwargs):
        super().__init__()
        _check_model_type(model_type)
        self.model_type = model_type
        backbone = MODEL_TYPES[model_type][0]
        self.model = DPTDepthModel(backbone=backbone, non_negative=True, **dpt_kwargs).eval()
        self.has_weights = False
        self.register_load_state_dict_pre_hook(MiDaSInference._note_weights)

    @staticmethod
    def _note_weights(module, state_dict, prefix, *args):
        if any(key.startswith(prefix + "model.") for key in state_dict):
            module.has_weights = True

    def train(self, mode=True):
        """Stays in eval mode: the depth network is never trained here."""
        return super().train(False)

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
    """(height, width) MiDaS resizes an image to: aspect kept, sides multiples of 32 (its "minimal" rule)."""
    _check_model_type(model_type)
    side, rule = MODEL_TYPES[model_type][1:3]
    scale_h, scale_w = side / height, side / width
    if rule == "minimal":  # the scale closest to 1 is used for both sides
        scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return int(np.round(scale_h * height / 32) * 32), int(np.round(scale_w * width / 32) * 32)


def midas_input(image, model_type="dpt_hybrid"):
    """Images [B, 3, H, W] in [-1, 1] -> the float32 MiDaS input [B, 3, h, w] on the same device.

    Follows MiDaS's transform: to [0, 1], OpenCV bicubic resize (``midas_input_size``), then
    (x - mean) / std computed in float64.
    """
    import cv2  # deferred: only depth conditioning needs OpenCV
    _check_model_type(model_type)
    mean, std = (np.asarray(v, dtype=np.float64) for v in MODEL_TYPES[model_type][3:])
    height, width = midas_input_size(image.shape[2], image.shape[3], model_type)
    out = []
    for img in ((image.detach().float() + 1.0) * .5).permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3]
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)
        img = (img - mean) / std
        out.append(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32))
    return torch.from_numpy(np.stack(out)).to(image.device)
