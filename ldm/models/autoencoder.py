"""First-stage autoencoders: the KL-regularised VAE of Stable Diffusion, and an identity stage."""
from contextlib import contextmanager

import pytorch_lightning as pl
import torch

from ldm.models.autoencoder_training import AutoencoderTrainingMixin
from ldm.models.init_ckpt import InitFromCheckpoint
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class AutoencoderKL(AutoencoderTrainingMixin, InitFromCheckpoint, pl.LightningModule):
    """Image <-> latent with a diagonal Gaussian posterior (Rombach et al. 2022, sec. 3.1).

    ``quant_conv`` maps encoder features to [mean | logvar] of ``embed_dim`` channels;
    ``post_quant_conv`` maps a latent back to decoder width. Training (two optimizers, the loss in
    ``lossconfig``) lives in autoencoder_training.py.
    """

    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, ema_decay=None, learn_logvar=False):
        super().__init__()
        self.learn_logvar = learn_logvar
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        assert ddconfig["double_z"], "AutoencoderKL needs double_z: True (mean and logvar)"
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.use_ema = ema_decay is not None
        if self.use_ema:
            self.ema_decay = ema_decay
            self.model_ema = LitEma(self, decay=ema_decay)
        self.request_init_checkpoint(ckpt_path, ignore_keys)

    @contextmanager
    def ema_scope(self, context=None):
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch, k):
        """Batch images are [B, H, W, C] in [-1, 1] (as datasets yield them); the model wants [B, C, H, W]."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self):
        return self.decoder.conv_out.weight


class IdentityFirstStage(torch.nn.Module):
    """A first stage that does nothing, for diffusion directly in pixel space."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        self.vq_interface = vq_interface
        super().__init__()

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
