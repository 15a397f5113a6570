import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.autoencoder import AutoencoderKL

DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _model(disc_start=1, ema_decay=None):
    torch.manual_seed(0)
    lossconfig = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                  "params": {"disc_start": disc_start, "perceptual_weight": 0.0, "kl_weight": 1e-6,
                             "disc_weight": 0.5, "disc_num_layers": 2}}
    model = AutoencoderKL(ddconfig=copy.deepcopy(DDCONFIG), lossconfig=lossconfig, embed_dim=4,
                          monitor="val/rec_loss", ema_decay=ema_decay)
    model.learning_rate = 1e-3
    return model


def _loader(n=4, batch_size=2):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 16, 16, 3, generator=g) * 2 - 1
    return DataLoader([{"image": im} for im in images], batch_size=batch_size)


def _trainer(max_steps, callbacks=()):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))


class Snapshots(pl.Callback):
    """Copies of one autoencoder and one discriminator weight after every batch."""

    def __init__(self):
        self.ae, self.disc = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ae.append(pl_module.decoder.conv_out.weight.detach().clone())
        self.disc.append(pl_module.loss.discriminator.main[0].weight.detach().clone())


def test_manual_optimisation_updates_discriminator_only_after_disc_start():
    model = _model(disc_start=1)
    ae0 = model.decoder.conv_out.weight.detach().clone()
    disc0 = model.loss.discriminator.main[0].weight.detach().clone()
    snaps = Snapshots()
    trainer = _trainer(max_steps=2, callbacks=[snaps])
    trainer.fit(model, _loader())
    assert trainer.global_step == 2 and len(snaps.ae) == 2  # global_step counts batches, not optimizer steps
    # batch 0 (< disc_start): the autoencoder learns, the discriminator loss is weighted 0
    assert not torch.equal(snaps.ae[0], ae0)
    assert torch.equal(snaps.disc[0], disc0)
    # batch 1 (= disc_start): both optimizers move their weights
    assert not torch.equal(snaps.ae[1], snaps.ae[0])
    assert not torch.equal(snaps.disc[1], snaps.disc[0])
    opt_ae, opt_disc = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    assert opt_ae.param_groups[0]["betas"] == (0.5, 0.9) and opt_disc.param_groups[0]["lr"] == 1e-3
    disc_ids = {id(p) for p in model.loss.discriminator.parameters()}
    assert not any(id(p) in disc_ids for g in opt_ae.param_groups for p in g["params"])
    assert all(p.requires_grad for p in model.loss.discriminator.parameters())  # untoggled again
    step = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    # the discriminator optimizer only steps from disc_start on (before it, its gradients are zero)
    assert step(opt_ae) == 2 and step(opt_disc) == 1


def test_validation_logs_rec_loss_and_ema():
    model = _model(ema_decay=0.99)
    trainer = _trainer(max_steps=1)
    trainer.fit(model, _loader(n=2))
    assert int(model.model_ema.num_updates) == 1
    metrics = trainer.validate(model, _loader(n=2), verbose=False)[0]
    assert {"val/rec_loss", "val/disc_loss", "val_ema/rec_loss"} <= set(metrics)
    assert metrics["val/d_weight"] == 0.0


def test_learn_logvar_puts_logvar_in_the_autoencoder_optimizer():
    model = _model()
    assert not any(p is model.loss.logvar for p in model.autoencoder_parameters())
    model.learn_logvar = True
    assert any(p is model.loss.logvar for p in model.autoencoder_parameters())


def test_log_images_keys():
    model = _model(ema_decay=0.99).eval()
    batch = next(iter(_loader(n=2)))
    log = model.log_images(batch)
    assert set(log) == {"inputs", "reconstructions", "samples", "reconstructions_ema", "samples_ema"}
    assert all(v.shape == (2, 3, 16, 16) for v in log.values())


def test_automatic_optimisation_cannot_be_switched_on():
    model = _model()
    assert model.automatic_optimization is False
    with pytest.raises(ValueError):
        model.automatic_optimization = True
