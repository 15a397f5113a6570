"""Autoencoder training loss: L1 + LPIPS reconstruction under a learned variance, KL, and a PatchGAN term.

Generator objective (``optimizer_idx=0``)::

    nll  = sum(|x - x_rec| + w_p * LPIPS(x, x_rec)) / exp(logvar) + logvar       (per sample)
    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + d_weight * disc_factor * (-mean D(x_rec))

``d_weight`` balances the GAN gradient against the reconstruction gradient at the decoder's last
layer (Esser et al. 2021, eq. 7); ``disc_factor`` is 0 until ``disc_start``.
Discriminator objective (``optimizer_idx=1``): hinge or vanilla GAN loss on real vs. reconstructed.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init


def adopt_weight(weight, global_step, threshold=0, value=0.):
    """``value`` before ``threshold`` steps, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1. - logits_real).mean() + F.relu(1. + logits_fake).mean())


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class LPIPSWithDiscriminator(nn.Module):
    def __init__(self, disc_start, logvar_init=0.0, kl_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                 disc_conditional=False, disc_loss="hinge", perceptual_weights_path=None):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise UserError(f"disc_loss {disc_loss!r} is not one of {', '.join(DISC_LOSSES)}")
        self.kl_weight = kl_weight
        # kept as in the official loss: pixelloss_weight is stored but the L1 term is not scaled by it
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            if perceptual_weights_path is None:
                raise UserError("LPIPSWithDiscriminator: perceptual_weight > 0 needs pretrained VGG16 + LPIPS "
                                "weights, which are never downloaded; set perceptual_weights_path to a local "
                                "file holding them, or set perceptual_weight: 0")
            from ldm.modules.losses.lpips import LPIPS
            self.perceptual_loss = LPIPS(weights_path=perceptual_weights_path)
        else:
            self.perceptual_loss = None
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer):
        """||grad nll|| / ||grad g_loss|| at ``last_layer``, clamped to [0, 1e4], times ``disc_weight``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _discriminate(self, images, cond):
        if self.disc_conditional != (cond is not None):
            raise ValueError("disc_conditional needs cond, and cond needs disc_conditional")
        if cond is not None:
            images = torch.cat((images, cond), dim=1)
        return self.discriminator(images.contiguous())

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None, cond=None,
                split="train", weights=None):
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, global_step, cond, split)
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(inputs.contiguous(),
                                                                                reconstructions.contiguous())
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if disc_factor > 0.0:
            g_loss = -torch.mean(self._discriminate(reconstructions, cond))
        else:
            # Before disc_start the GAN term is multiplied by 0: skip the discriminator and the
            # adaptive-weight gradients (as costly as the autoencoder itself); the loss is unchanged.
            g_loss = torch.zeros((), device=inputs.device)
        # The balance needs gradients; in validation (no grad, or eval mode) the GAN term gets weight 0.
        if disc_factor > 0.0 and self.training and torch.is_grad_enabled() and last_layer is not None:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:
            d_weight = torch.tensor(0.0, device=inputs.device)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor)), f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log

    def _discriminator_loss(self, inputs, reconstructions, global_step, cond, split):
        logits_real = self._discriminate(inputs.detach(), cond)
        logits_fake = self._discriminate(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log
