"""Lightning training logic shared by DDPM and LatentDiffusion (steps, EMA updates, optimizers).

Conditioning dropout for classifier-free guidance (Ho & Salimans 2022) follows the official
``ucg_training`` parameter: ``{txt: {p: 0.1, val: ""}}`` replaces each caption in ``batch["txt"]`` by
``""`` with probability 0.1 before the step, so the model also learns the unconditional prediction.
"""
import logging

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.errors import UserError
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def drop_conditioning(batch, ucg_training, rng):
    """Replace ``batch[key][i]`` by ``val`` with probability ``p`` for every ``key: {p, val}`` (in place).

    One ``rng.choice(2, p=[1 - p, p])`` draw per item and key, in batch order: the official draw sequence.
    """
    for key, spec in ucg_training.items():
        if key not in batch:
            raise UserError(f"ucg_training names batch key {key!r}, but batches have {sorted(batch)}")
        p = float(spec["p"])
        val = spec.get("val")
        val = "" if val is None else val
        items = batch[key]
        if isinstance(items, tuple):
            items = batch[key] = list(items)
        for i in range(len(items)):
            if rng.choice(2, p=[1 - p, p]):
                items[i] = val
    return batch


class DiffusionTrainingMixin:
    """Expects ``get_input``/``forward`` (returning ``loss, loss_dict``), ``model``, ``use_ema``,
    ``model_ema``, ``ema_scope``, ``learn_logvar``, ``logvar`` and ``learning_rate`` (set by main.py)."""

    def shared_step(self, batch):
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    @property
    def ucg_rng(self):
        """numpy RNG for conditioning dropout, seeded from torch's seed (set by ``--seed``) and the rank."""
        if getattr(self, "_ucg_rng", None) is None:
            seed = (torch.initial_seed() + 1000003 * self.global_rank) % 2 ** 32
            self._ucg_rng = np.random.RandomState(seed)
        return self._ucg_rng

    def training_step(self, batch, batch_idx):
        if self.ucg_training:
            drop_conditioning(batch, self.ucg_training, self.ucg_rng)
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                      batch_size=self._batch_size(batch))
        self.log("global_step", float(self.global_step), prog_bar=False, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, logger=True, on_step=True,
                     on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        bs = self._batch_size(batch)
        _, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs)
        if self.use_ema:
            with self.ema_scope():
                _, loss_dict_ema = self.shared_step(batch)
            self.log_dict({k + "_ema": v for k, v in loss_dict_ema.items()}, prog_bar=False, logger=True,
                          on_step=False, on_epoch=True, batch_size=bs)

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self):
        params = list(self.model.parameters())
        if getattr(self, "cond_stage_trainable", False) and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not self.use_scheduler:
            return opt
        lr_schedule = instantiate_from_config(self.scheduler_config)
        scheduler = {"scheduler": LambdaLR(opt, lr_lambda=lr_schedule.schedule), "interval": "step", "frequency": 1}
        return [opt], [scheduler]

    def _batch_size(self, batch):
        x = batch[self.first_stage_key]
        return len(x)
