"""Lightning training of ``AutoencoderKL``: autoencoder and PatchGAN discriminator, optimised in turn.

Lightning 2 has no ``optimizer_idx``: each training step runs both updates by hand (manual
optimisation), first the autoencoder (loss ``optimizer_idx=0``), then the discriminator on the same,
detached reconstructions (``optimizer_idx=1``).

Lightning counts every ``LightningOptimizer.step()`` in ``global_step``; the discriminator update goes
through ``trainer.strategy.optimizer_step`` instead, so ``global_step`` counts batches as it did for the
official (Lightning 1.4) runs: ``disc_start``, ``--max_steps`` and the image logger's frequency all
count batches. Under DDP use ``strategy: ddp_find_unused_parameters_true``: each backward leaves the
other network's parameters without gradients.
"""
import torch


def _no_closure():
    return None


class AutoencoderTrainingMixin:
    """Expects ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``, ``loss`` (an
    LPIPSWithDiscriminator), ``image_key``, ``use_ema``/``model_ema``/``ema_scope``, ``learn_logvar`` and
    ``learning_rate`` (set by main.py)."""

    @property
    def automatic_optimization(self):
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value):
        if value:
            raise ValueError("AutoencoderKL trains with manual optimisation (two optimizers)")

    def _loss(self, inputs, reconstructions, posterior, optimizer_idx, split, step):
        return self.loss(inputs, reconstructions, posterior, optimizer_idx, step,
                         last_layer=self.get_last_layer(), split=split)

    def training_step(self, batch, batch_idx):
        opt_ae, opt_disc = self.optimizers()
        inputs = self.get_input(batch, self.image_key)
        bs = inputs.shape[0]
        step = self.global_step  # batches trained so far; the autoencoder update below increments it

        self.toggle_optimizer(opt_ae)  # discriminator weights get no gradient from the generator loss
        reconstructions, posterior = self(inputs)
        aeloss, log_dict_ae = self._loss(inputs, reconstructions, posterior, 0, "train", step)
        opt_ae.zero_grad()
        self.manual_backward(aeloss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        discloss, log_dict_disc = self._loss(inputs, reconstructions.detach(), posterior, 1, "train", step)
        # Before disc_start the discriminator loss is 0 * loss: its gradients are zero and Adam would
        # not move, so the update is skipped rather than computed.
        if discloss.requires_grad and step >= self.loss.discriminator_iter_start:
            opt_disc.zero_grad()
            self.manual_backward(discloss)
            self.trainer.strategy.optimizer_step(opt_disc.optimizer, closure=_no_closure)  # not in global_step
        self.untoggle_optimizer(opt_disc)

        self.log("aeloss", aeloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("discloss", discloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=bs)
        self.log_dict({**log_dict_ae, **log_dict_disc}, prog_bar=False, logger=True, on_step=True, on_epoch=False,
                      batch_size=bs)

    def validation_step(self, batch, batch_idx):
        log_dict = self._validation_step(batch)
        if self.use_ema:
            with self.ema_scope():
                self._validation_step(batch, postfix="_ema")
        return log_dict

    def _validation_step(self, batch, postfix=""):
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        split = "val" + postfix
        _, log_dict_ae = self._loss(inputs, reconstructions, posterior, 0, split, self.global_step)
        _, log_dict_disc = self._loss(inputs, reconstructions, posterior, 1, split, self.global_step)
        # includes {split}/rec_loss, the metric the official configs monitor
        self.log_dict({**log_dict_ae, **log_dict_disc}, batch_size=inputs.shape[0])
        return log_dict_ae

    def autoencoder_parameters(self):
        params = [p for m in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv)
                  for p in m.parameters()]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        return params

    def configure_optimizers(self):
        lr = self.learning_rate
        opt_ae = torch.optim.Adam(self.autoencoder_parameters(), lr=lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self)

    @torch.no_grad()
    def log_images(self, batch, only_inputs=False, log_ema=False, **kwargs):
        """inputs, reconstructions, and decodings of random latents ("samples"), all in [-1, 1]."""
        log = dict()
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = xrec
            if log_ema or self.use_ema:
                with self.ema_scope():
                    xrec_ema, posterior_ema = self(x)
                    log["samples_ema"] = self.decode(torch.randn_like(posterior_ema.sample()))
                    log["reconstructions_ema"] = xrec_ema
        log["inputs"] = x
        return log
