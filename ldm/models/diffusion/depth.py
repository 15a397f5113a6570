"""Depth-to-image: the U-Net input is [noisy latent, depth map of the source image] (4 + 1 channels).

The depth map comes from the frozen MiDaS model (``depth_model.*``) run on the MiDaS-prepared image
(batch key ``midas_in``, see ``ldm.modules.midas.api.midas_input``), or is given directly (batch
key ``depth``: any [B, 1, H, W] map where larger means nearer, as MiDaS predicts). Either way it
is resized to the latent size (bicubic) and normalised per image to [-1, 1].
"""
import torch
import torch.nn.functional as F

from ldm.models.diffusion.finetune import LatentFinetuneDiffusion

DEPTH_MAP_KEY = "depth"


def normalize_depth(depth, eps=1e-3):
    """Per image: 2 (d - min) / (max - min + eps) - 1, so values lie in [-1, 1].

    The training code uses eps = 1e-3, the official sampling scripts eps = 0. A constant map (zero
    range) maps to -1 instead of dividing by zero.
    """
    lo = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    hi = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    span = (hi - lo + eps).clamp_min(torch.finfo(depth.dtype).tiny)
    return 2. * (depth - lo) / span - 1.


def depth_at_latent_size(depth, latent_size, eps=1e-3):
    """Depth [B, 1, H, W] -> bicubic resize to ``latent_size`` -> ``normalize_depth``."""
    depth = F.interpolate(depth, size=tuple(latent_size), mode="bicubic", align_corners=False)
    return normalize_depth(depth, eps)


class LatentDepth2ImageDiffusion(LatentFinetuneDiffusion):
    """Conditions on monocular depth; ``depth_stage_config`` builds the estimator (``MiDaSInference``)."""

    def __init__(self, depth_stage_config, concat_keys=("midas_in",), *args, **kwargs):
        super().__init__(concat_keys, *args, frozen_stages={"depth_model": depth_stage_config}, **kwargs)
        self.depth_stage_key = concat_keys[0]

    def concat_inputs(self, batch, bs=None):
        """The MiDaS input is already [B, 3, H, W]; a ``depth`` entry, when present, replaces the estimate."""
        if DEPTH_MAP_KEY in batch:
            return {DEPTH_MAP_KEY: torch.as_tensor(batch[DEPTH_MAP_KEY])[:bs].to(self.device).float()}
        return {self.depth_stage_key: torch.as_tensor(batch[self.depth_stage_key])[:bs].to(self.device)}

    def estimate_depth(self, midas_in):
        """Relative inverse depth [B, 1, H, W] of a MiDaS input (fails without depth weights)."""
        return self.depth_model(midas_in.to(self.device))

    @torch.no_grad()
    def concat_conditioning(self, images, latent_size, eps=1e-3):
        depth = images.get(DEPTH_MAP_KEY)
        if depth is None:
            depth = self.estimate_depth(images[self.depth_stage_key])
        if depth.ndim == 3:
            depth = depth[:, None]
        return depth_at_latent_size(depth.to(self.device).float(), latent_size, eps)
