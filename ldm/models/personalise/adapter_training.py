"""Training a small adapter on a frozen base model through main.py, with the base model's own diffusion loss.

The base is an inference config plus its weights (loaded strictly, as the sampling scripts load them) and
stays bit-for-bit as loaded: eval mode, no gradients, not in the optimizer, not in the checkpoints. A run's
checkpoints hold the adapter alone; resuming rebuilds the base from its config and weights. Every checkpoint
save and the end of training also export the adapter in the files the community tools read, into
``<run>/adapters/``.
"""
import contextlib
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.checkpoint import file_hash, load_model
from ldm.config_safety import is_trusted
from ldm.data.prior_preservation import LOSS_WEIGHT_KEY, merge_prior_examples
from ldm.errors import UserError
from ldm.models.diffusion.training import drop_conditioning
from ldm.modules.freeze import freeze_module

log = logging.getLogger(__name__)

BASE_PREFIX = "base."  # state-dict keys of the frozen base: never saved, never loaded from a run's checkpoint
ADAPTERS_FOLDER = "adapters"


class AdapterTraining(pl.LightningModule):
    """A frozen base latent-diffusion model and the adapter trained on it (the base of TI, LoRA, hypernetworks).

    ``base_config`` / ``base_ckpt``: the base model's inference YAML and weights (paths as main.py runs).
    ``ucg_training``: caption dropout as the diffusion models take it (``{caption: {p: 0.1, val: ""}}``); off by
    default. ``weight_decay``: AdamW's, on the adapter's parameters (0, as A1111 trains embeddings).
    ``learning_rate`` is set by main.py from ``model.base_learning_rate``.

    A subclass:

    - calls ``super().__init__(base_config, base_ckpt, ...)`` first; ``self.base`` is then the frozen model. It
      then creates its parameters as attributes of ``self``, outside ``self.base`` (state-dict keys not starting
      with ``base.``): those are what checkpoints hold. It changes nothing inside ``self.base`` for good;
    - ``adapter_parameters()``: the parameters the optimizer trains;
    - ``attached()``: a context manager within which ``self.base`` runs with the adapter (forward hooks, the text
      encoder's embeddings, ...) and after which it runs without it; training steps and image logging use it;
    - ``export(directory, step)``: writes the adapter's files into ``directory`` (created by the caller), after
      ``step`` optimizer steps; called on rank 0 at every checkpoint save and at the end of training;
    - sets ``needs_prompt_gradients = True`` when the adapter acts inside the text encoder: captions are then
      encoded within the training step with gradients, instead of beforehand without.
    """

    needs_prompt_gradients = False
    learning_rate = None

    def __init__(self, base_config, base_ckpt, ucg_training=None, weight_decay=0.0):
        super().__init__()
        self.base_ckpt = Path(base_ckpt)
        # the base config is trusted exactly as far as the training config that names it
        self.base = freeze_module(load_model(base_config, base_ckpt, device="cpu", trust_config=is_trusted()))
        self.ucg_training = dict(ucg_training or {})
        self.weight_decay = float(weight_decay)
        self._base_hash = None
        self._exported_step = None
        self._dropout_rng = None

    # ------------------------------------------------------------------ what a subclass provides
    def adapter_parameters(self):
        raise NotImplementedError

    def attached(self):
        raise NotImplementedError

    def export(self, directory, step):
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def _prompts_encoded_in_step(self):
        """LatentDiffusion encodes captions without gradients in get_input unless its encoder is trainable;
        with this flag it encodes them in forward, where gradients reach the adapter."""
        previous = self.base.cond_stage_trainable
        self.base.cond_stage_trainable = previous or self.needs_prompt_gradients
        try:
            yield
        finally:
            self.base.cond_stage_trainable = previous

    def training_step(self, batch, batch_idx):
        batch = merge_prior_examples(batch)   # instance then regularisation examples, one batch
        weights = batch.pop(LOSS_WEIGHT_KEY, None)
        if self.ucg_training:
            if self._dropout_rng is None:
                self._dropout_rng = np.random.RandomState((torch.initial_seed() + 1000003 * self.global_rank) % 2 ** 32)
            drop_conditioning(batch, self.ucg_training, self._dropout_rng)
        # regularisation images (kohya's reg folders) weigh in with their prior_loss_weight
        with self.attached(), self._prompts_encoded_in_step(), self.base.item_loss_weights(weights):
            loss, _ = self.base.shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=len(batch[self.base.first_stage_key]))
        return loss

    def configure_optimizers(self):
        if self.learning_rate is None:
            raise UserError(f"{type(self).__name__} has no learning_rate; main.py sets it from "
                            f"model.base_learning_rate")
        params = list(self.adapter_parameters())
        if not params:
            raise UserError(f"{type(self).__name__} has no parameters to train")
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    @torch.no_grad()
    def log_images(self, batch, **kwargs):
        with self.attached():
            return self.base.log_images(batch, **kwargs)

    # ------------------------------------------------------------------ checkpoints: the adapter alone
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(BASE_PREFIX)}
        self._export_now()

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load an adapter checkpoint; the base keeps the weights it was built with."""
        own = [k for k in self.state_dict() if not k.startswith(BASE_PREFIX)]
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise UserError(f"checkpoint does not fit {type(self).__name__}: missing {missing[:3] or 'none'}, "
                            f"unexpected {unexpected[:3] or 'none'}; resume with the config the run was trained with")
        result = super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
        return type(result)(missing, unexpected)

    def on_train_end(self):
        self._export_now()

    def _export_now(self):
        if not self.trainer.is_global_zero or self._exported_step == self.global_step:
            return
        directory = self.run_folder() / ADAPTERS_FOLDER
        directory.mkdir(parents=True, exist_ok=True)
        self.export(directory, self.global_step)
        self._exported_step = self.global_step

    def run_folder(self):
        """The run's folder: the parent of the checkpoint folder (main.py's layout), else the trainer's root."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath).parent
        return Path(self.trainer.default_root_dir)

    @property
    def base_hash(self):
        """The base weights' short hash as A1111 records it (first 10 hex digits of the file's sha256)."""
        if self._base_hash is None:
            self._base_hash = file_hash(self.base_ckpt)
        return self._base_hash
