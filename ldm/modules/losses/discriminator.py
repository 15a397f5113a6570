"""PatchGAN discriminator (Isola et al. 2017, pix2pix) in the layout of taming-transformers.

State-dict keys (``discriminator.main.<i>.*``) follow that layout, so discriminators from
official autoencoder training checkpoints load unchanged.
"""
import torch
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation whose ``loc``/``scale`` are set from the first training batch
    (Kingma & Dhariwal 2018, Glow), then learned."""

    def __init__(self, num_features):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x):
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, B*H*W]
        self.loc.copy_(-per_channel.mean(1)[None, :, None, None])
        self.scale.copy_(1 / (per_channel.std(1)[None, :, None, None] + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x):
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


def weights_init(module):
    """DCGAN initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02) with zero shift."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0)


class NLayerDiscriminator(nn.Module):
    """Conv stack giving one real/fake logit per overlapping image patch ([B, 1, h, w]).

    ``n_layers`` stride-2 4x4 convs (widths ndf * 1, 2, 4, 8, 8, ...), one stride-1 conv, and a 1-channel
    output conv; normalisation is BatchNorm, or ActNorm with ``use_actnorm``.
    """

    def __init__(self, input_nc=3, ndf=64, n_layers=3, use_actnorm=False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own shift, so its convs carry no bias
        kw, padw = 4, 1
        layers = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out_width = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [nn.Conv2d(width, out_width, kw, stride=stride, padding=padw, bias=use_bias),
                       norm_layer(out_width), nn.LeakyReLU(0.2, True)]
            width = out_width
        layers.append(nn.Conv2d(width, 1, kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)
