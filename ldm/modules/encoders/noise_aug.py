"""Noise augmentation of CLIP image embeddings (Stable unCLIP), with the Karlo noise schedule.

The embedding is standardised with the CLIP embedding statistics, noised by q_sample at
``noise_level``, and mapped back; the level's sinusoidal embedding is returned next to it. The
model concatenates both into the U-Net's ``y`` vector (``adm_in_channels`` = 2 x ``timestep_dim``).
"""
from pathlib import Path

import torch

from ldm.checkpoint import read_torch_file
from ldm.errors import UserError
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.modules.diffusionmodules.util import timestep_embedding


def load_clip_stats(path):
    """(mean, std) of CLIP image embeddings from a Karlo ``*_stats.th`` file, each [D]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CLIP embedding statistics file '{path}' does not exist; download ViT-L-14_stats.th from "
                        f"the Karlo release (kakaobrain/karlo-v1-alpha) to that path or set clip_stats_path")
    stats = read_torch_file(path, what="CLIP embedding statistics file")
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2
            and all(isinstance(s, torch.Tensor) for s in stats)):
        raise UserError(f"CLIP embedding statistics file '{path}' must hold a (mean, std) pair of tensors")
    mean, std = (torch.as_tensor(s, dtype=torch.float32).reshape(-1) for s in stats)
    return mean, std


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """``forward(x, noise_level)`` -> (noised embedding [B, D], level embedding [B, timestep_dim]).

    Without ``clip_stats_path`` the statistics are mean 0, std 1 (the unCLIP-H config).
    """

    def __init__(self, *args, clip_stats_path=None, timestep_dim=256, **kwargs):
        super().__init__(*args, **kwargs)
        if clip_stats_path is None:
            mean, std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
        else:
            mean, std = load_clip_stats(clip_stats_path)
        # not checkpoint keys: the statistics always come from the stats file
        self.register_buffer("data_mean", mean[None, :], persistent=False)
        self.register_buffer("data_std", std[None, :], persistent=False)
        self.timestep_dim = timestep_dim

    def scale(self, x):
        """To zero mean, unit variance."""
        return (x - self.data_mean) * 1. / self.data_std

    def unscale(self, x):
        return x * self.data_std + self.data_mean

    def time_embed(self, noise_level):
        return timestep_embedding(noise_level, self.timestep_dim)

    def forward(self, x, noise_level=None):
        noise_level = self.noise_levels(noise_level, x.shape[0], x.device)
        z = self.unscale(self.q_sample(self.scale(x), noise_level))
        return z, self.time_embed(noise_level)
