"""Stable unCLIP: latent diffusion conditioned on text and on a CLIP image embedding.

The image embedding (``embedder``) is noise-augmented by ``noise_augmentor`` and concatenated with
the embedding of its noise level; that vector is the U-Net's ``y`` (``c_adm``, through the
"sequential" label embedding with ``adm_in_channels`` = 2 x embedding width). During training
whole embeddings are dropped with probability ``embedding_dropout`` (classifier-free guidance).
"""
import torch

from ldm.models.diffusion.ddpm_base import DDPM
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.freeze import freeze_module
from ldm.util import instantiate_from_config


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    def __init__(self, embedder_config, embedding_key="jpg", embedding_dropout=0.5, freeze_embedder=True,
                 noise_aug_config=None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        self._init_embedder(embedder_config, freeze_embedder)
        self._init_noise_aug(noise_aug_config)

    def _init_embedder(self, config, freeze=True):
        embedder = instantiate_from_config(config)
        self.embedder = freeze_module(embedder) if freeze else embedder

    def _init_noise_aug(self, config):
        self.noise_augmentor = None
        if config is not None:
            # Karlo's noise schedule for CLIP image embeddings
            self.noise_augmentor = freeze_module(instantiate_from_config(config))

    def adm_conditioning(self, embedding, noise_level=None):
        """[noised embedding, noise-level embedding] [B, 2D] (the embedding itself without an augmentor)."""
        if self.noise_augmentor is None:
            return embedding
        noised, level_emb = self.noise_augmentor(embedding, noise_level=noise_level)
        return torch.cat((noised, level_emb), 1)

    @torch.no_grad()
    def embed_images(self, images):
        """CLIP image embeddings [B, D] of images [B, 3, H, W] in [-1, 1]."""
        return self.embedder(images.to(self.device))

    def get_input(self, batch, k, cond_key=None, bs=None, **kwargs):
        outputs = LatentDiffusion.get_input(self, batch, k, bs=bs, **kwargs)
        z, c = outputs[0], outputs[1]
        img = DDPM.get_input(self, batch, self.embed_key)[:bs]
        c_adm = self.adm_conditioning(self.embed_images(img))
        if self.training:
            keep = torch.bernoulli((1. - self.embedding_dropout) * torch.ones(c_adm.shape[0], device=c_adm.device))
            c_adm = keep[:, None] * c_adm
        return [z, {"c_crossattn": [c], "c_adm": c_adm}, *outputs[2:]]
